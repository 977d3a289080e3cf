"""The task layer: which failures are retried, and when a Prefect cache key is offered."""

import shutil
from types import SimpleNamespace

from prefect.states import Completed, Failed

from ctdiff.cases import discover_cases
from ctdiff.preprocess import decode_case, decode_key, resize_case, resize_key
from ctdiff.store import CaseStore
from ctdiff.synth import SynthSpec, synthesize
from tasks.preprocess import INGEST_CACHE
from tasks.training import is_transient


def test_only_io_errors_are_retried():
    assert is_transient(None, None, Failed(data=OSError(5, "Input/output error")))
    assert is_transient(None, None, Failed(data=TimeoutError()))  # an OSError subclass
    assert not is_transient(None, None, Failed(data=ValueError("bad data")))
    assert not is_transient(None, None, Completed(data=1))


class _Recorded:
    """Stands for Prefect's result store: which keys have a persisted result."""

    def __init__(self):
        self.keys = set()

    def exists(self, key):
        return key in self.keys


def test_cache_key_follows_the_store(tmp_path):
    synthesize(tmp_path / "in", SynthSpec(n_cases=1, size=16, n_thin=10))
    (ref,) = discover_cases(tmp_path / "in")
    store = CaseStore(tmp_path / "s.zarr")
    store.create()
    recorded = _Recorded()
    ctx = SimpleNamespace(result_store=recorded)
    inputs = {"ref": ref.to_dict(), "store_path": str(store.path), "resolution": 8, "chunk_slices": 8, "level": 1}
    key = resize_key(decode_key(ref), 8, 8, 1)

    # First run: nothing anywhere, so the key is offered and the result will be cached under it.
    assert INGEST_CACHE.compute_key(ctx, inputs, {}) == key
    decode_case(ref, store)
    resize_case(ref, store, 8)
    assert store.native_key(ref.id) == decode_key(ref)  # the key is the one the store records
    recorded.keys.add(key)
    assert INGEST_CACHE.compute_key(ctx, inputs, {}) == key

    # The output is deleted but its result is recorded: withhold the key so the task runs.
    shutil.rmtree(store.path / "cases" / ref.id)
    assert INGEST_CACHE.compute_key(ctx, inputs, {}) is None
    resize_case(ref, store, 8)
    assert INGEST_CACHE.compute_key(ctx, inputs, {}) == key
    shutil.rmtree(store.path / "native" / ref.id)  # the native arrays count too
    assert INGEST_CACHE.compute_key(ctx, inputs, {}) is None

    # A new grid is a new key, offered while nothing is recorded under it.
    assert INGEST_CACHE.compute_key(ctx, {**inputs, "resolution": 4}, {}) == resize_key(decode_key(ref), 4, 8, 1)

    # The key follows the content of the case file: a changed file is a new input.
    with open(ref.path, "ab") as handle:
        handle.write(b"\0")
    assert INGEST_CACHE.compute_key(ctx, inputs, {}) == resize_key(decode_key(ref), 8, 8, 1) != key
