"""Task runners built from config: Dask for per-case fan-out."""

from __future__ import annotations

import logging

from prefect.client.orchestration import get_client
from prefect_dask import DaskTaskRunner

from ctdiff.config import DaskConfig


def dask_task_runner(config: DaskConfig) -> DaskTaskRunner:
    """An existing scheduler when `address` is set, else a LocalCluster of worker processes.

    One thread per worker: a case decode holds ~3x a case's HU in memory and is mostly
    single-threaded, so processes, not threads, add throughput.
    """
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
