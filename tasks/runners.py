"""Task runners built from config: Dask for per-case fan-out."""

from __future__ import annotations

from prefect_dask import DaskTaskRunner

from ctdiff.config import DaskConfig


def dask_task_runner(config: DaskConfig) -> DaskTaskRunner:
    """An existing scheduler when `address` is set, else a LocalCluster of worker processes.

    One thread per worker: a case decode holds ~3x a case's HU in memory and is mostly
    single-threaded, so processes, not threads, add throughput.
    """
    if config.address:
        return DaskTaskRunner(address=config.address)
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": config.n_workers,
            "threads_per_worker": 1,
            "processes": True,
            "memory_limit": config.memory_limit,
            "dashboard_address": None,
        }
    )
