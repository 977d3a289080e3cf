"""Task runners built from config: Dask for per-case fan-out."""

from __future__ import annotations

import logging
import os
import queue
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import dask
from distributed import KilledWorker, WorkerPlugin

from prefect.client.orchestration import get_client
from prefect.futures import PrefectFuture
from prefect_dask import DaskTaskRunner

from ctdiff.config import DaskConfig
from ctdiff.threads import threads_per_process


# Dask spawns workers with MALLOC_TRIM_THRESHOLD_=65536, which also pins glibc's mmap threshold
# at 128 KiB: every DICOM member and slice buffer becomes a fresh mmap, and decoding runs ~2x
# slower (benchmarks/RESULTS.md). A 16 MiB mmap threshold keeps them on the heap, trimming on.
WORKER_PRESPAWN_ENV = {"MALLOC_MMAP_THRESHOLD_": str(16 * 2**20)}


def use_worker_prespawn_env() -> None:
    """Set WORKER_PRESPAWN_ENV for Dask nannies created from now on in this process (they read
    distributed.nanny.pre-spawn-environ when the cluster starts)."""
    dask.config.set({f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in WORKER_PRESPAWN_ENV.items()})


# Loggers that, while a cluster closes, report what closing does to it: a worker whose heartbeat
# finds the scheduler gone logs "Failed to communicate with scheduler during heartbeat" with a
# CommClosedError traceback (at ERROR, so silence_logs=ERROR would not hide it).
SHUTDOWN_LOGGERS = ("distributed.worker", "distributed.core", "distributed.nanny", "distributed.comm")


def _quiet_shutdown_logging() -> None:
    """Run on each worker of a LocalCluster about to close: nothing it logs from then on is news."""
    for name in SHUTDOWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)


class ClearLineBeforeLogs(WorkerPlugin):
    """A worker's console log lines start on a cleared terminal line: its stderr is the terminal
    the CLI draws progress bars on, and a record written mid-bar would continue the bar's line."""

    name = "ctdiff-clear-line-before-logs"

    def setup(self, worker) -> None:
        from prefect.logging.configuration import ensure_logging_setup

        from tasks.progress import clear_line_before_logs, console_handlers

        ensure_logging_setup()  # Prefect's console handlers, made now rather than at the first task
        for handler in console_handlers():
            clear_line_before_logs(handler)


class LocalDaskTaskRunner(DaskTaskRunner):
    """The DaskTaskRunner of a LocalCluster of ctdiff's own: quiet at shutdown. Its workers, and this
    process's nannies and scheduler, drop the errors of the cluster closing under them (only then:
    during the run they log warnings and errors as set by silence_logs). On a terminal, the
    workers' log lines clear the CLI's progress bar line first (ClearLineBeforeLogs)."""

    def __exit__(self, *args) -> None:
        if self._client is not None:
            try:
                self._client.run(_quiet_shutdown_logging)
            except (OSError, TimeoutError) as error:  # a worker already gone is quiet anyway; say so
                logging.getLogger(__name__).debug("workers not quieted before shutdown: %r", error)
        levels = {name: logging.getLogger(name).level for name in SHUTDOWN_LOGGERS}
        for name in SHUTDOWN_LOGGERS:
            logging.getLogger(name).setLevel(logging.CRITICAL)
        try:
            super().__exit__(*args)
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)


def dask_task_runner(config: DaskConfig) -> DaskTaskRunner:
    """An existing scheduler when `address` is set, a KubeCluster with `kubernetes`, else a
    LocalCluster of worker processes.

    One thread per worker: a case decode holds ~3x a case's HU in memory and is mostly
    single-threaded, so processes, not threads, add throughput.
    """
    use_worker_prespawn_env()
    # Scheduler and nanny chatter drowns the task log at INFO; warnings still show.
    logging.getLogger("distributed").setLevel(logging.WARNING)
    if config.address:
        return DaskTaskRunner(address=config.address)
    if config.kubernetes:
        from dask_kubernetes.operator import KubeCluster  # the k8s extra

        return DaskTaskRunner(
            cluster_class=KubeCluster,
            cluster_kwargs={"custom_cluster_spec": kube_cluster_spec(config, dict(os.environ)),
                            "namespace": _pod_namespace(), "shutdown_on_close": True},
        )
    # A worker that dies (killed, out of memory) gets the tasks it held counted against them
    # (distributed.scheduler.allowed-failures, then KilledWorker): hold only the running case,
    # none queued behind it, so that only that case is blamed.
    dask.config.set({"distributed.scheduler.worker-saturation": 1.0})
    # No statistical profiler in the workers (the cluster has no dashboard to show it): its
    # samples accumulate for the worker's life, ~0.2 MB per case (benchmarks/scale.py).
    dask.config.set({"distributed.worker.profile.enabled": False})
    # Worker processes must report to the API this flow run uses: without PREFECT_API_URL that
    # is an embedded server they would not know of, and each would start its own.
    with get_client(sync_client=True) as client:
        api_url = str(client.api_url).rstrip("/")
    return LocalDaskTaskRunner(
        cluster_kwargs={
            "n_workers": config.n_workers,
            "threads_per_worker": 1,
            "processes": True,
            "memory_limit": config.memory_limit,
            "dashboard_address": None,
            "silence_logs": logging.WARNING,
            # Workers share the CPUs: each sizes torch/OpenMP for its part, so that workers and
            # their threads do not multiply past the cores (ctdiff.threads).
            "env": {"PREFECT_API_URL": api_url, "OMP_NUM_THREADS": str(threads_per_process(config.n_workers))},
            # Each worker, restarted ones too, sets it up as it starts.
            "plugins": [ClearLineBeforeLogs()] if sys.stderr.isatty() else [],
        }
    )


T = TypeVar("T")


def as_completed(futures: dict[PrefectFuture[Any], T]) -> Iterator[tuple[PrefectFuture[Any], T]]:
    """Yield `(future, value)` for each future of `futures` as it finishes, popping it first.

    Unlike `prefect.futures.as_completed`, which holds every future it was given until the last
    one finishes, nothing here keeps a finished future once the caller lets go of it. On Dask
    that is what frees a task's result on its worker: with Prefect's, each worker kept every
    case's result to the end of the run, ~0.2 MB a case (benchmarks/RESULTS.md, "Scale on one
    machine").
    """
    finished: queue.SimpleQueue[PrefectFuture[Any]] = queue.SimpleQueue()
    for future in futures:
        future.add_done_callback(finished.put)
    while futures:
        future = finished.get()
        yield future, futures.pop(future)
        del future  # not held while waiting for the next one


def failure_reason(error: BaseException) -> str:
    """The quarantine reason of a per-case task that failed after its retries, or that Dask gave
    up on because every worker running it died (KilledWorker: usually out of memory)."""
    if isinstance(error, KilledWorker):
        return f"its Dask worker died {error.allowed_failures + 1} times while running it (out of memory?)"
    detail = getattr(error, "strerror", None) or type(error).__name__
    return f"failed after retries: {detail}"


# Where the ctdiff pool templates (deployments/*-job-template.json) mount the shared volume and
# what they tell the flow's pod about itself, so Dask worker pods can be made alike.
DATA_MOUNT = "/opt/ctdiff/data"
PROJECT_DIR = "/opt/ctdiff"
_SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def kube_cluster_spec(config: DaskConfig, env: dict[str, str]) -> dict:
    """A DaskCluster resource (dask-kubernetes operator) whose scheduler and `n_workers` workers
    run the flow pod's image with its data volume, working directory and Prefect settings.

    `env` is the flow pod's environment: CTDIFF_IMAGE and CTDIFF_VOLUME_CLAIM (set by our pool
    templates), PREFECT_API_URL (set by the worker) and PREFECT_RESULTS_LOCAL_STORAGE_PATH.
    """
    from dask_kubernetes.operator import make_cluster_spec

    missing = [name for name in ("CTDIFF_IMAGE", "CTDIFF_VOLUME_CLAIM", "PREFECT_API_URL") if not env.get(name)]
    if missing:
        raise ValueError(
            f"preprocess.dask.kubernetes: {', '.join(missing)} not set; run the flow from a ctdiff "
            "Kubernetes pool (deployments/setup.sh), or use preprocess.dask.address or n_workers instead"
        )
    worker_env = {
        "PREFECT_API_URL": env["PREFECT_API_URL"],
        **{k: env[k] for k in ("PREFECT_API_KEY", "PREFECT_RESULTS_LOCAL_STORAGE_PATH") if env.get(k)},
        **WORKER_PRESPAWN_ENV,
    }
    memory = config.memory_limit.replace("iB", "i")  # Dask's GiB is Kubernetes' Gi
    spec = make_cluster_spec(
        name=f"ctdiff-preprocess-{uuid.uuid4().hex[:8]}",
        image=env["CTDIFF_IMAGE"],
        n_workers=config.n_workers,
        resources={"requests": {"memory": memory}, "limits": {"memory": memory}},
        env=worker_env,
    )
    worker_args = spec["spec"]["worker"]["spec"]["containers"][0]["args"]
    worker_args += ["--nthreads", "1", "--memory-limit", config.memory_limit]
    for role in ("scheduler", "worker"):
        pod = spec["spec"][role]["spec"]
        pod["volumes"] = [{"name": "data", "persistentVolumeClaim": {"claimName": env["CTDIFF_VOLUME_CLAIM"]}}]
        for container in pod["containers"]:
            container["volumeMounts"] = [{"name": "data", "mountPath": DATA_MOUNT}]
            container["workingDir"] = PROJECT_DIR  # relative config paths (data/...) resolve as in the flow pod
    return spec


def _pod_namespace() -> str | None:
    """The flow pod's namespace (None outside a pod: the kube config's default)."""
    if _SERVICE_ACCOUNT_NAMESPACE.is_file():
        return _SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
    return None
