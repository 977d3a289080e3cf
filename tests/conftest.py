import os

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
# Flows run against a temporary server per run, leaving nothing running (tests/test_local_server.py
# checks the background server that `ctdiff` uses by default).
os.environ.setdefault("CTDIFF_SERVER", "embedded")
# One torch thread everywhere, whatever else the machine runs: results (bit-exact resume
# included) then do not depend on how many threads ctdiff.threads finds free.
os.environ.setdefault("CTDIFF_THREADS", "1")


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """A throwaway Prefect server and result storage for flow tests."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    storage = tmp_path_factory.mktemp("prefect-results")
    os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(storage)  # inherited by Dask worker processes
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: storage}):
        with prefect_test_harness(server_startup_timeout=180):
            yield storage


@pytest.fixture(scope="module")
def one_torch_thread():
    """One OpenMP thread for the module: two stall each other when another process holds a core
    (as parallel runs do), and one is as fast for the tiny models of the tests."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vae_store(tmp_path_factory):
    """Three synthetic 32 px cases ingested at native resolution: two train, one val."""
    from ctdiff.cases import discover_cases
    from ctdiff.preprocess import decode_case, resize_case
    from ctdiff.store import CaseStore
    from ctdiff.synth import SynthSpec, synthesize

    root = tmp_path_factory.mktemp("vae-store")
    synthesize(root / "in", SynthSpec(n_cases=3, size=32, n_thin=20))
    store = CaseStore(root / "store.zarr")
    store.create()
    refs = discover_cases(root / "in")
    for ref in refs:
        decode_case(ref, store)
        resize_case(ref, store, resolution=None)
    ids = sorted(ref.id for ref in refs)
    store.set_splits({ids[0]: "train", ids[1]: "train", ids[2]: "val"})
    return store
