"""The task layer: which failures are retried, and when a Prefect cache key is offered."""

from prefect.states import Completed, Failed

from ctdiff.cases import discover_cases
from ctdiff.preprocess import decode_case, decode_key, resize_case, resize_key
from ctdiff.store import CaseStore
from ctdiff.synth import SynthSpec, synthesize
from tasks.preprocess import StoreBackedCache, is_transient


def test_only_io_errors_are_retried():
    assert is_transient(None, None, Failed(data=OSError(5, "Input/output error")))
    assert is_transient(None, None, Failed(data=TimeoutError()))  # an OSError subclass
    assert not is_transient(None, None, Failed(data=ValueError("bad data")))
    assert not is_transient(None, None, Completed(data=1))


def test_cache_key_is_offered_only_for_complete_store_output(tmp_path):
    synthesize(tmp_path / "in", SynthSpec(n_cases=1, size=16, n_thin=10))
    (ref,) = discover_cases(tmp_path / "in")
    store = CaseStore(tmp_path / "s.zarr")
    store.create()
    inputs = {"ref": ref.to_dict(), "store_path": str(store.path), "resolution": 8, "chunk_slices": 8, "level": 3}
    decode_policy, resize_policy = StoreBackedCache(step="decode"), StoreBackedCache(step="resize")

    assert decode_policy.compute_key(None, inputs, {}) is None
    assert resize_policy.compute_key(None, inputs, {}) is None
    decode_case(ref, store)
    assert decode_policy.compute_key(None, inputs, {}) == decode_key(ref)
    assert resize_policy.compute_key(None, inputs, {}) is None
    resize_case(ref, store, 8)
    expected = resize_key(store.native_key(ref.id), 8, 8, 3)
    assert resize_policy.compute_key(None, inputs, {}) == expected
    assert resize_policy.compute_key(None, {**inputs, "resolution": 4}, {}) is None

    # The key follows the content of the case file: a changed file is a new, uncached input.
    old_key = decode_key(ref)
    with open(ref.path, "ab") as handle:
        handle.write(b"\0")
    assert decode_key(ref) != old_key
    assert decode_policy.compute_key(None, inputs, {}) is None
