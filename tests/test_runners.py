"""Dask task runners from config (the KubeCluster spec that preprocess.dask.kubernetes starts), and
reading their futures as they finish."""

import concurrent.futures
import gc
import uuid
import weakref

import pytest
from dask_kubernetes.operator import KubeCluster
from prefect.futures import PrefectConcurrentFuture
from prefect.states import Completed

from ctdiff.config import ConfigError, DaskConfig, load_config
from tasks.runners import DATA_MOUNT, WORKER_PRESPAWN_ENV, as_completed, dask_task_runner, kube_cluster_spec

POD_ENV = {
    "CTDIFF_IMAGE": "ctdiff:0.1.0",
    "CTDIFF_VOLUME_CLAIM": "ctdiff-data",
    "PREFECT_API_URL": "http://prefect-server.ctdiff:4200/api",
    "PREFECT_RESULTS_LOCAL_STORAGE_PATH": "/opt/ctdiff/data/prefect-results",
    "HOME": "/home/ctdiff",  # not passed on
}


def test_kube_cluster_workers_are_made_like_the_flow_pod():
    spec = kube_cluster_spec(DaskConfig(kubernetes=True, n_workers=32, memory_limit="8GiB"), POD_ENV)
    assert spec["kind"] == "DaskCluster" and spec["metadata"]["name"].startswith("ctdiff-preprocess-")
    worker = spec["spec"]["worker"]
    assert worker["replicas"] == 32
    for role in ("scheduler", "worker"):
        pod = spec["spec"][role]["spec"]
        assert pod["volumes"] == [{"name": "data", "persistentVolumeClaim": {"claimName": "ctdiff-data"}}]
        (container,) = pod["containers"]
        assert container["image"] == POD_ENV["CTDIFF_IMAGE"]
        assert container["volumeMounts"] == [{"name": "data", "mountPath": DATA_MOUNT}]
        assert container["workingDir"] == "/opt/ctdiff"
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env == {"PREFECT_API_URL": POD_ENV["PREFECT_API_URL"],
                       "PREFECT_RESULTS_LOCAL_STORAGE_PATH": POD_ENV["PREFECT_RESULTS_LOCAL_STORAGE_PATH"],
                       **WORKER_PRESPAWN_ENV}
        assert container["resources"] == {"requests": {"memory": "8Gi"}, "limits": {"memory": "8Gi"}}
    args = worker["spec"]["containers"][0]["args"]
    assert args[0] == "dask-worker" and args[-4:] == ["--nthreads", "1", "--memory-limit", "8GiB"]


def test_kube_cluster_outside_a_ctdiff_pod_is_a_clear_error():
    env = {k: v for k, v in POD_ENV.items() if k != "CTDIFF_VOLUME_CLAIM"}
    with pytest.raises(ValueError, match="CTDIFF_VOLUME_CLAIM not set"):
        kube_cluster_spec(DaskConfig(kubernetes=True), env)


def test_runner_starts_a_kube_cluster_from_config(monkeypatch):
    for name, value in POD_ENV.items():
        monkeypatch.setenv(name, value)
    runner = dask_task_runner(DaskConfig(kubernetes=True, n_workers=3))
    assert runner.cluster_class is KubeCluster
    assert runner.cluster_kwargs["custom_cluster_spec"]["spec"]["worker"]["replicas"] == 3
    assert runner.cluster_kwargs["shutdown_on_close"] is True


def test_an_address_and_a_kube_cluster_are_refused_together():
    with pytest.raises(ConfigError, match="preprocess.dask: .*not both"):
        load_config(None, ["preprocess.dask.address=tcp://scheduler:8786", "preprocess.dask.kubernetes=true"])


def test_as_completed_lets_go_of_each_future_it_yields():
    # prefect.futures.as_completed holds every future to the end: on Dask, every task's result
    # then stays on its worker for the whole run. Ours pops each and keeps none it has yielded.
    raw = [concurrent.futures.Future() for _ in range(3)]
    futures = {PrefectConcurrentFuture(uuid.uuid4(), f): name for f, name in zip(raw, "abc")}
    watch = {name: weakref.ref(future) for future, name in futures.items()}
    raw[1].set_result(Completed())
    finished = as_completed(futures)
    first, name = next(finished)
    assert name == "b" and first.wrapped_future.done() and set(futures.values()) == {"a", "c"}
    del first
    raw[0].set_result(Completed())
    raw[0] = raw[1] = None  # only what as_completed and the caller hold is left
    second, name = next(finished)
    assert name == "a"
    gc.collect()
    assert watch["b"]() is None  # released while "c" is still running
    assert watch["a"]() is not None  # the caller's
    del second
    raw[2].set_result(Completed())
    assert [name for _, name in finished] == ["c"]
    assert futures == {}
