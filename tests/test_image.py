"""The image, built here and run as a pod or a Docker worker runs it.

`deployments/build-image.sh --base debian` builds the Dockerfile on a CPU base made from Debian's
packages (cached after the first run: the base and the dependency layers are reused, so a code
change rebuilds only the last layers). Then, in the image, as uid 10001 with a read-only root
filesystem and a host folder mounted at /opt/ctdiff/data: `ctdiff demo` with its default config
and `ctdiff infer` on one case; and a real `prefect worker` of the ctdiff-docker pool runs the
`preprocess/docker` deployment in the image. Skipped, with the reason, where no Docker daemon
answers (`.ci/run` installs and starts one where it can).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
from pathlib import Path

import httpx
import nibabel
import numpy as np
import pytest
import yaml
from prefect_server import BIN, deploy_all, prefect_server, run_on_worker

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
TAG = "ctdiff:test"
UID = "10001:10001"
DATA_MOUNT = "/opt/ctdiff/data"
# The demo config with its paths on the volume (as config/default.yaml's are), tiny cases.
OVERRIDES = ["paths.input=data/cases", "paths.store=data/store.zarr", "paths.work=data/work",
             "preprocess.resolution=16", "preprocess.dask.n_workers=1"]


def _docker_missing() -> str | None:
    try:
        answer = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"no docker client ({error})"
    if answer.returncode != 0:
        return f"no Docker daemon answers: {answer.stderr.strip()[:200]}"
    return None


def _volume(folder: Path) -> Path:
    """A host folder the image's user (uid 10001) can write, as a pool's volume would be."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        os.chown(folder, 10001, 10001)
    else:
        folder.chmod(0o777)
    return folder


def _run_in_image(data: Path, *command: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """`command` in the image as a pod runs it: uid 10001, read-only root, the volume at
    /opt/ctdiff/data (the working directory here), a writable /tmp."""
    return subprocess.run(
        ["docker", "run", "--rm", "--network", "host", "--user", UID, "--read-only", "--tmpfs", "/tmp",
         "-v", f"{data}:{DATA_MOUNT}", "-w", DATA_MOUNT, TAG, *command],
        capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    if reason := _docker_missing():
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("image")
    # The torch this environment runs, as a wheel from wherever pip finds it: the base then has
    # the same build (a CPU one on a CPU machine) without choosing an index here.
    torch = importlib.metadata.version("torch").split("+")[0]
    subprocess.run([str(BIN / "pip"), "download", "-q", "--no-deps", "--dest", str(root / "wheels"), f"torch=={torch}"],
                   check=True, capture_output=True, timeout=1800)
    build = subprocess.run(
        ["bash", "deployments/build-image.sh", "--base", "debian", "--wheels", str(root / "wheels"),
         "--torch", torch, TAG],
        cwd=ROOT, capture_output=True, text=True, timeout=3600,
    )
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-4000:]
    summary = build.stdout.strip().splitlines()[-1]
    match = re.fullmatch(rf"{TAG}: (\d+) MB; torch (\S+), CUDA none \(CPU build\)", summary)
    assert match, summary
    assert match[2].split("+")[0] == torch
    print(f"\n{summary}")
    return TAG


def test_the_image_runs_as_uid_10001_with_its_packaged_configs(image, tmp_path):
    data = _volume(tmp_path / "data")
    shown = _run_in_image(data, "sh", "-c", "id -u; ctdiff config show --config default", timeout=120)
    assert shown.returncode == 0, shown.stderr
    uid, config = shown.stdout.split("\n", 1)
    assert uid == "10001"
    assert yaml.safe_load(config)["paths"] == {"input": "data/cases", "store": "data/store.zarr", "work": "data/work"}


def test_demo_and_infer_run_in_the_image_with_a_read_only_root(image, tmp_path):
    data = _volume(tmp_path / "data")
    demo = _run_in_image(data, "ctdiff", "demo")
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    work = data / "ctdiff-demo" / "work"
    metrics = json.loads(next(work.glob("reports/*/metrics.json")).read_text())
    assert {"cubic", "vae_ceiling"} <= set(metrics["methods"])
    assert next(work.glob("reports/*/report.md")).stat().st_size > 0

    case = next((data / "ctdiff-demo" / "cases").rglob("*.zip"))
    infer = _run_in_image(
        data, "ctdiff", "infer", "--checkpoint", "ctdiff-demo/work/checkpoints/diffusion/best.pt",
        "--input", str(case.relative_to(data)), "--output", "thin.nii.gz", timeout=600,
    )
    assert infer.returncode == 0, infer.stdout[-3000:] + infer.stderr[-3000:]
    volume = nibabel.load(data / "thin.nii.gz")
    assert volume.shape[2] > 10 and np.isfinite(np.asarray(volume.dataobj)).all()
    # Everything the runs wrote is on the volume and belongs to the image's user.
    assert {p.stat().st_uid for p in data.rglob("*")} == {10001}


def test_docker_pool_runs_a_deployment_in_the_image(image, tmp_path):
    from ctdiff.store import CaseStore
    from ctdiff.synth import SynthSpec, synthesize

    data = _volume(tmp_path / "data")
    synthesize(data / "cases", SynthSpec(n_cases=2, size=32, n_thin=10))
    if os.geteuid() == 0:  # the cases as a user of the image would have put them there
        for path in data.rglob("*"):
            os.chown(path, 10001, 10001)
    with prefect_server(tmp_path, PREFECT_WORKER_QUERY_SECONDS="2") as (api_url, env):
        # The pool's defaults: this image, this folder as the volume, no GPU (none here).
        deploy_all(env, f"docker.image={image}", f"docker.data_volume={data}", "docker.device_requests=null")
        run, worker_log = run_on_worker(
            env, "ctdiff-docker", "preprocess/docker", ["config=config/demo.yaml", f"overrides={json.dumps(OVERRIDES)}"],
            cwd=tmp_path, timeout_s=900)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + worker_log
        runs = httpx.post(f"{api_url}/flow_runs/filter", json={}).json()  # preprocess and its subflow
        assert {r["state"]["type"] for r in runs} == {"COMPLETED"}, [r["state"] for r in runs]
    manifest = CaseStore(data / "store.zarr").manifest()
    assert [e["status"] for e in manifest] == ["ok", "ok"]
    assert CaseStore(data / "store.zarr").read(manifest[0]["id"], "thin").hu.shape[1:] == (16, 16)
    # Cached task results went where the pool's result_storage_path points: on the volume.
    assert any(p.is_file() for p in (data / "prefect-results").rglob("*"))
