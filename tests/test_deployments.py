"""Deployments: prefect.yaml, the Kubernetes pool templates, the image, and a real local run.

The Kubernetes Jobs are rendered by prefect-kubernetes' own job configuration, exactly as its
worker would before submitting them; the end-to-end test runs `deployments/setup.sh` against a
real `prefect server` on loopback and a `process` worker runs a deployment on synthetic cases.
"""

import asyncio
import json
import re
import subprocess
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from deployments.pool_template import main as pool_template_main
from deployments.pool_template import with_defaults
from prefect_server import BIN, deploy_all, prefect_server, run_on_worker

ROOT = Path(__file__).resolve().parent.parent
DATA_MOUNT = "/opt/ctdiff/data"
FLOWS = {
    "preprocess": "flows/preprocess.py:preprocess",
    "train-vae": "flows/train_vae.py:train_vae",
    "encode-latents": "flows/encode_latents.py:encode_latents",
    "train-diffusion": "flows/train_diffusion.py:train_diffusion",
    "evaluate": "flows/evaluate.py:evaluate",
    "pipeline": "flows/pipeline.py:pipeline",
    "infer": "flows/infer.py:infer",
}
K8S_POOL = {name: "ctdiff-cpu" if name == "preprocess" else "ctdiff-gpu" for name in FLOWS}


def _deployments() -> list[dict]:
    return yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]


def _flow_name(entrypoint: str) -> str:
    return {path: name for name, path in FLOWS.items()}[entrypoint]


def _template(pool: str) -> dict:
    kind = pool.removeprefix("ctdiff-")
    return json.loads((ROOT / "deployments" / f"{kind}-job-template.json").read_text())


def _dockerfile_value(instruction: str) -> str:
    (value,) = re.findall(rf"^{instruction}\s+(\S+)\s*$", (ROOT / "Dockerfile").read_text(), re.M)
    return value


# --- prefect.yaml -------------------------------------------------------------------------------


def test_every_flow_has_a_kubernetes_a_docker_and_a_local_deployment():
    declared = {(_flow_name(d["entrypoint"]), d["name"]): d["work_pool"]["name"] for d in _deployments()}
    expected = {}
    for name in FLOWS:
        expected[(name, "k8s-cpu" if name == "preprocess" else "k8s-gpu")] = K8S_POOL[name]
        expected[(name, "docker")] = "ctdiff-docker"
        expected[(name, "local")] = "ctdiff-local"
    expected[("evaluate", "nightly")] = "ctdiff-gpu"
    assert declared == expected
    assert len(_deployments()) == len(declared), "a flow/deployment name is declared twice"


def test_nightly_evaluate_is_scheduled_with_the_default_config():
    (nightly,) = [d for d in _deployments() if d["name"] == "nightly"]
    (schedule,) = nightly["schedules"]
    assert schedule["cron"] == "0 2 * * *" and schedule["active"] is True
    # The newest checkpoint, whichever of best/last training wrote last (the default is best.pt).
    assert nightly["parameters"] == {"config": "config/default.yaml", "overrides": ["evaluate.checkpoint=newest"]}
    evaluate = yaml.safe_load((ROOT / "config/default.yaml").read_text())["evaluate"]
    assert evaluate["checkpoints"] == [] and evaluate["checkpoint"] == "best"


def test_pods_start_in_the_image_project_folder_and_local_runs_where_deployed():
    workdir = _dockerfile_value("WORKDIR")
    for d in _deployments():
        if d["work_pool"]["name"] == "ctdiff-local":
            # No pull step: `prefect deploy` records the project folder it ran in.
            assert "pull" not in d, d
        else:
            assert d["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": workdir}}]
    assert DATA_MOUNT == f"{workdir}/data"
    paths = yaml.safe_load((ROOT / "config/default.yaml").read_text())["paths"]
    assert all(str(p).startswith("data/") for p in paths.values()), "default paths must land on the volume"


@pytest.mark.parametrize("name", FLOWS)
def test_entrypoint_imports_and_takes_config_and_overrides(name, monkeypatch):
    from prefect.flows import load_flow_from_entrypoint
    from prefect.utilities.callables import parameter_schema

    monkeypatch.chdir(ROOT)  # entrypoints are relative to the project folder, as for prefect deploy
    flow = load_flow_from_entrypoint(FLOWS[name])
    assert flow.name == name
    schema = parameter_schema(flow)
    assert set(schema.properties) == {"config", "overrides"}
    assert schema.required == []


# --- Kubernetes pool templates and the Jobs they render -----------------------------------------


def test_unknown_fields_catches_misplaced_keys():
    from prefect_kubernetes.worker import KubernetesWorker

    # prefect-kubernetes' own default puts the Job's completions and parallelism in the pod spec.
    default = KubernetesWorker.get_default_base_job_template()["job_configuration"]["job_manifest"]
    assert _unknown_fields(default, "V1Job") == [
        "job.spec.template.spec.completions", "job.spec.template.spec.parallelism",
    ]


def test_templates_extend_prefect_kubernetes_default_and_share_one_job():
    from prefect_kubernetes.worker import KubernetesWorker

    default = KubernetesWorker.get_default_base_job_template()
    gpu, cpu = _template("ctdiff-gpu"), _template("ctdiff-cpu")
    assert gpu["job_configuration"] == cpu["job_configuration"], "pools differ only in variable defaults"
    for template in (gpu, cpu):
        assert set(default["variables"]["properties"]) <= set(template["variables"]["properties"])
        assert set(default["job_configuration"]) == set(template["job_configuration"])


def _render(pool: str, job_variables: dict, template: dict | None = None) -> dict:
    """The Job manifest prefect-kubernetes' worker would submit for a run of this deployment."""
    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    configuration = asyncio.run(
        KubernetesWorkerJobConfiguration.from_template_and_values(template or _template(pool), job_variables)
    )
    configuration.prepare_for_flow_run(FlowRun(id=uuid.uuid4(), name="brave-tapir", flow_id=uuid.uuid4()))
    return configuration.job_manifest


def _unknown_fields(data, type_name: str, path: str = "job") -> list[str]:
    """Keys of a manifest that the Kubernetes API's type `type_name` does not have.

    The API server drops unknown fields with at most a warning, so a misplaced key (a Job's
    `completions` inside its pod spec, a `volumeMount`) would silently do nothing.
    """
    import kubernetes.client.models

    if isinstance(data, str):  # a scalar, or an unrendered template's "{{ placeholder }}"
        return []
    if match := re.fullmatch(r"[Ll]ist\[(.+)\]", type_name):
        return [e for i, item in enumerate(data) for e in _unknown_fields(item, match[1], f"{path}[{i}]")]
    if match := re.fullmatch(r"[Dd]ict[\[(]str,\s*(.+)[\])]", type_name):
        return [e for key, item in data.items() for e in _unknown_fields(item, match[1], f"{path}.{key}")]
    model = getattr(kubernetes.client.models, type_name, None)
    if model is None:  # a number, a quantity, a free-form object
        return []
    attribute = {key: name for name, key in model.attribute_map.items()}
    unknown = []
    for key, value in data.items():
        if key in attribute:
            unknown += _unknown_fields(value, model.openapi_types[attribute[key]], f"{path}.{key}")
        else:
            unknown.append(f"{path}.{key}")
    return unknown


def _pod(manifest: dict) -> tuple[dict, dict]:
    pod = manifest["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container


@pytest.mark.parametrize(
    "deployment", [d for d in _deployments() if d["work_pool"]["name"] in ("ctdiff-gpu", "ctdiff-cpu")],
    ids=lambda d: f"{_flow_name(d['entrypoint'])}/{d['name']}",
)
def test_rendered_job_mounts_the_volume_and_names_the_image(deployment, prefect_harness):
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    pool = deployment["work_pool"]["name"]
    manifest = _render(pool, deployment["work_pool"].get("job_variables", {}))
    pod, container = _pod(manifest)
    assert _unknown_fields(manifest, "V1Job") == []
    assert manifest["kind"] == "Job" and manifest["metadata"]["namespace"] == "ctdiff"
    assert container["image"] == "ctdiff:0.1.0" and container["imagePullPolicy"] == "IfNotPresent"
    assert container["args"] == ["prefect", "flow-run", "execute"]

    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts[DATA_MOUNT]]["persistentVolumeClaim"] == {"claimName": "ctdiff-data"}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"

    env = {e["name"]: e["value"] for e in container["env"]}
    # The pool's value wins over the one the worker passes on from its own settings.
    worker_env = KubernetesWorkerJobConfiguration._base_environment()
    assert worker_env["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] == str(prefect_harness)
    assert env["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] == f"{DATA_MOUNT}/prefect-results"
    assert env["CTDIFF_IMAGE"] == "ctdiff:0.1.0" and env["CTDIFF_VOLUME_CLAIM"] == "ctdiff-data"

    user = pod["securityContext"]
    assert f"{user['runAsUser']}:{user['runAsGroup']}" == _dockerfile_value("USER")
    assert user["fsGroup"] == user["runAsGroup"]
    if pool == "ctdiff-gpu":
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    else:
        assert "nvidia.com/gpu" not in container["resources"]["limits"]
        assert "nodeSelector" not in pod and "tolerations" not in pod


def test_job_variables_select_gpus_image_and_volume(prefect_harness):
    manifest = _render("ctdiff-gpu", {"gpus": 4, "image": "registry.example.com/ctdiff:2", "volume_claim": "big"})
    pod, container = _pod(manifest)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert container["image"] == "registry.example.com/ctdiff:2"
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "big"}} in pod["volumes"]

    # setup.sh's VARIABLE=VALUE arguments become the pool's defaults.
    template = with_defaults(_template("ctdiff-cpu"), ["image=registry.example.com/ctdiff:3", "gpus=1"])
    pod, container = _pod(_render("ctdiff-cpu", {}, template))
    assert container["image"] == "registry.example.com/ctdiff:3"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_docker_template_extends_prefect_docker_default():
    from prefect_docker.worker import DockerWorker

    default = DockerWorker.get_default_base_job_template()
    template = _template("ctdiff-docker")
    # volumes and container_create_kwargs are made by the template from its own variables.
    assert set(default["variables"]["properties"]) - {"volumes", "container_create_kwargs"} <= set(
        template["variables"]["properties"])
    assert set(default["job_configuration"]) == set(template["job_configuration"])


def _render_docker(job_variables: dict, template: dict | None = None):
    """The container settings prefect-docker's worker would create a run's container with."""
    from prefect.client.schemas.objects import FlowRun
    from prefect_docker.worker import DockerWorkerJobConfiguration

    configuration = asyncio.run(DockerWorkerJobConfiguration.from_template_and_values(
        template or _template("ctdiff-docker"), job_variables))
    configuration.prepare_for_flow_run(FlowRun(id=uuid.uuid4(), name="brave-tapir", flow_id=uuid.uuid4()))
    return configuration


@pytest.mark.parametrize(
    "deployment", [d for d in _deployments() if d["work_pool"]["name"] == "ctdiff-docker"],
    ids=lambda d: f"{_flow_name(d['entrypoint'])}/{d['name']}",
)
def test_docker_runs_mount_the_volume_and_request_the_gpus(deployment, prefect_harness):
    job = _render_docker(deployment["work_pool"].get("job_variables", {}))
    assert job.image == "ctdiff:0.1.0" and job.network_mode == "host"
    assert job.command == "prefect flow-run execute"
    assert job.volumes == [f"ctdiff-data:{DATA_MOUNT}"]
    assert job.env["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] == f"{DATA_MOUNT}/prefect-results"
    assert job.container_create_kwargs["shm_size"] == "16g"
    gpus = job.container_create_kwargs["device_requests"]
    if _flow_name(deployment["entrypoint"]) == "preprocess":
        assert gpus is None
    else:  # all GPUs, as `docker run --gpus all`
        assert gpus == [{"count": -1, "capabilities": [["gpu"]]}]
        import docker.types

        assert docker.types.DeviceRequest(**gpus[0]) == {
            "Driver": "", "Count": -1, "DeviceIDs": [], "Capabilities": [["gpu"]], "Options": {}}


def test_docker_job_variables_select_the_volume_and_gpus(prefect_harness):
    job = _render_docker({"data_volume": "/srv/ctdiff", "device_requests": [{"device_ids": ["1"], "capabilities": [["gpu"]]}]})
    assert job.volumes == [f"/srv/ctdiff:{DATA_MOUNT}"]
    assert job.container_create_kwargs["device_requests"] == [{"device_ids": ["1"], "capabilities": [["gpu"]]}]
    # setup.sh's docker.VARIABLE=VALUE arguments become the Docker pool's defaults.
    job = _render_docker({}, with_defaults(_template("ctdiff-docker"), ["image=ctdiff:2", "shm_size=2g"]))
    assert job.image == "ctdiff:2" and job.container_create_kwargs["shm_size"] == "2g"


@pytest.mark.parametrize(
    "argument, message",
    [("imag=ctdiff:1", "imag: not a variable"), ("gpus=two", "gpus=\"two\""), ("image", "expected VARIABLE=VALUE")],
)
def test_pool_template_refuses_unknown_variables_and_bad_values(argument, message, capsys):
    code = pool_template_main([str(ROOT / "deployments/gpu-job-template.json"), argument])
    assert code == 2
    assert message in capsys.readouterr().err


# --- the image ----------------------------------------------------------------------------------


def test_dockerfile_lints_clean():
    result = subprocess.run([BIN / "hadolint", "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_docker_context_holds_what_the_dockerfile_copies():
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    copied = set()
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            copied.update(part.rstrip("/") for part in line.split()[1:-1])
    assert copied == allowed


# --- end to end: a real server, setup.sh, a process worker, a deployment run ---------------------


@pytest.fixture(scope="module")
def deployed_server(tmp_path_factory):
    """`prefect server` on a free loopback port, set up by deployments/setup.sh."""
    root = tmp_path_factory.mktemp("prefect-e2e")
    with prefect_server(root, PREFECT_RESULTS_LOCAL_STORAGE_PATH=str(root / "results"),
                        PREFECT_WORKER_QUERY_SECONDS="2") as (api_url, env):
        deploy_all(env, "image=registry.example.com/ctdiff:e2e", "docker.data_volume=/srv/ctdiff-e2e")
        yield {"api_url": api_url, "env": env, "root": root}


@pytest.mark.slow
def test_setup_creates_the_pools_and_every_deployment(deployed_server):
    api = deployed_server["api_url"]
    pools = {p["name"]: p for p in httpx.post(f"{api}/work_pools/filter", json={}).json()}
    assert {name: pools[name]["type"] for name in ("ctdiff-gpu", "ctdiff-cpu", "ctdiff-docker", "ctdiff-local")} == {
        "ctdiff-gpu": "kubernetes", "ctdiff-cpu": "kubernetes", "ctdiff-docker": "docker", "ctdiff-local": "process",
    }
    docker_variables = pools["ctdiff-docker"]["base_job_template"]["variables"]["properties"]
    assert docker_variables["data_volume"]["default"] == "/srv/ctdiff-e2e"  # setup.sh's docker. argument
    assert docker_variables["image"]["default"] == "ctdiff:0.1.0"  # not the Kubernetes pools' image
    for name in ("ctdiff-gpu", "ctdiff-cpu"):
        variables = pools[name]["base_job_template"]["variables"]["properties"]
        assert variables["image"]["default"] == "registry.example.com/ctdiff:e2e"  # setup.sh's argument
        assert pools[name]["base_job_template"]["job_configuration"] == _template(name)["job_configuration"]

    flows = {f["id"]: f["name"] for f in httpx.post(f"{api}/flows/filter", json={}).json()}
    deployments = {
        f"{flows[d['flow_id']]}/{d['name']}": d for d in httpx.post(f"{api}/deployments/filter", json={}).json()
    }
    assert set(deployments) == {f"{_flow_name(d['entrypoint'])}/{d['name']}" for d in _deployments()}
    local = deployments["preprocess/local"]
    assert local["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
    assert local["parameter_openapi_schema"]["properties"].keys() == {"config", "overrides"}
    (schedule,) = deployments["evaluate/nightly"]["schedules"]
    assert schedule["schedule"]["cron"] == "0 2 * * *"


@pytest.mark.slow
def test_local_preprocess_deployment_runs_on_a_process_worker(deployed_server, tmp_path):
    from ctdiff.store import CaseStore
    from ctdiff.synth import SynthSpec, synthesize

    env = deployed_server["env"]
    synthesize(tmp_path / "cases", SynthSpec(n_cases=2, size=32, n_thin=10))
    config = tmp_path / "e2e.yaml"
    config.write_text(yaml.safe_dump({
        "paths": {"input": str(tmp_path / "cases"), "store": str(tmp_path / "store.zarr"), "work": str(tmp_path / "work")},
        "preprocess": {"resolution": 32, "retries": 0, "dask": {"n_workers": 1, "memory_limit": "1GiB"}},
    }))
    run, worker_log = run_on_worker(
        env, "ctdiff-local", "preprocess/local", [f"config={config}", 'overrides=["preprocess.resolution=16"]'],
        cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + worker_log
    assert "Completed" in run.stdout

    manifest = CaseStore(tmp_path / "store.zarr").manifest()
    assert [e["status"] for e in manifest] == ["ok", "ok"]
    assert CaseStore(tmp_path / "store.zarr").read(manifest[0]["id"], "thin").hu.shape[1:] == (16, 16)
    # The worker's PREFECT_RESULTS_LOCAL_STORAGE_PATH reached the flow run and its Dask worker.
    assert any(p.is_file() for p in (deployed_server["root"] / "results").rglob("*"))


@pytest.mark.slow
def test_ui_answers_at_the_server_address(deployed_server):
    api = deployed_server["api_url"]
    page = httpx.get(api.removesuffix("/api") + "/")
    assert page.status_code == 200 and "<title>Prefect Server</title>" in page.text
    settings = httpx.get(api.removesuffix("/api") + "/ui-settings").json()
    assert settings["api_url"] == api
