"""Task runners built from config: Dask for per-case fan-out."""

from __future__ import annotations

import logging

import dask

from prefect.client.orchestration import get_client
from prefect_dask import DaskTaskRunner

from ctdiff.config import DaskConfig


# Dask spawns workers with MALLOC_TRIM_THRESHOLD_=65536, which also pins glibc's mmap threshold
# at 128 KiB: every DICOM member and slice buffer becomes a fresh mmap, and decoding runs ~2x
# slower (benchmarks/RESULTS.md). A 16 MiB mmap threshold keeps them on the heap, trimming on.
WORKER_PRESPAWN_ENV = {"MALLOC_MMAP_THRESHOLD_": str(16 * 2**20)}


def use_worker_prespawn_env() -> None:
    """Set WORKER_PRESPAWN_ENV for Dask nannies created from now on in this process (they read
    distributed.nanny.pre-spawn-environ when the cluster starts)."""
    dask.config.set({f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in WORKER_PRESPAWN_ENV.items()})


def dask_task_runner(config: DaskConfig) -> DaskTaskRunner:
    """An existing scheduler when `address` is set, else a LocalCluster of worker processes.

    One thread per worker: a case decode holds ~3x a case's HU in memory and is mostly
    single-threaded, so processes, not threads, add throughput.
    """
    use_worker_prespawn_env()
    # Scheduler and nanny chatter drowns the task log at INFO; warnings still show.
    logging.getLogger("distributed").setLevel(logging.WARNING)
    if config.address:
        return DaskTaskRunner(address=config.address)
    # Worker processes must report to the API this flow run uses: without PREFECT_API_URL that
    # is an embedded server they would not know of, and each would start its own.
    with get_client(sync_client=True) as client:
        api_url = str(client.api_url).rstrip("/")
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": config.n_workers,
            "threads_per_worker": 1,
            "processes": True,
            "memory_limit": config.memory_limit,
            "dashboard_address": None,
            "silence_logs": logging.WARNING,
            "env": {"PREFECT_API_URL": api_url},
        }
    )
