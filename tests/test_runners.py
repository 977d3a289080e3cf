"""Dask task runners from config: the KubeCluster spec that preprocess.dask.kubernetes starts."""

import pytest
from dask_kubernetes.operator import KubeCluster

from ctdiff.config import ConfigError, DaskConfig, load_config
from tasks.runners import DATA_MOUNT, WORKER_PRESPAWN_ENV, dask_task_runner, kube_cluster_spec

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
