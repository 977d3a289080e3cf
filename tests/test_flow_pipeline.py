"""The `pipeline` flow end to end on tiny synthetic cases, and what a second run redoes."""

import json
import time

import pytest
import yaml
from pipeline_fixtures import tiny_pipeline_config

from ctdiff.evaluate import load_metrics
from ctdiff.synth import SynthSpec, synthesize

pytestmark = pytest.mark.slow

METHODS = {"model", "nearest", "linear", "cubic", "vae_ceiling"}
# Tasks that do work, by name (task_run_name prefixes for the per-case ones). Bookkeeping tasks
# (discover-cases, create-store, write-splits, reports, previews) run every time by design: they
# notice new cases and refresh the Prefect UI's artifacts.
UPSTREAM = ("ingest-", "train-vae", "resolve-vae-checkpoint", "encode-", "scale-factor")
WORK = (*UPSTREAM, "train-diffusion", "checkpoint-digest", "score-cases")


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    synthesize(root / "cases", SynthSpec(n_cases=5, size=32, n_thin=20, seed=1))
    return tiny_pipeline_config(root, {"train": 0.4, "val": 0.2, "test": 0.4})


def _task_runs_since(started: float) -> dict[str, list[str]]:
    """{task run name: [state names]} of the tasks of every flow run started after `started`."""
    from datetime import datetime, timezone

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter, FlowRunFilterId, FlowRunFilterStartTime, TaskRunFilter, TaskRunFilterSubFlowRuns,
    )
    from prefect.client.schemas.sorting import FlowRunSort, TaskRunSort

    after = datetime.fromtimestamp(started, tz=timezone.utc)
    with get_client(sync_client=True) as client:
        # Prefect 3.8's sync client sends null for every argument left out, which the API refuses.
        flow_runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=after)),
            sort=FlowRunSort.START_TIME_DESC, limit=50, offset=0,
        )
        task_runs = client.read_task_runs(
            # Sub-flows show as task runs too; only real tasks count.
            task_run_filter=TaskRunFilter(subflow_runs=TaskRunFilterSubFlowRuns(exists_=False)),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id for run in flow_runs])),
            sort=TaskRunSort.EXPECTED_START_TIME_DESC, limit=200, offset=0,
        )
    runs: dict[str, list[str]] = {}
    for run in task_runs:
        runs.setdefault(run.name, []).append(run.state.name if run.state else "?")
    return runs


def _states(runs: dict[str, list[str]], prefixes: tuple[str, ...]) -> dict[str, list[str]]:
    return {name: states for name, states in runs.items() if name.startswith(prefixes)}


@pytest.fixture(scope="module")
def first_run(config_path, prefect_harness):
    from flows.pipeline import pipeline

    started = time.time()
    result = pipeline(config=str(config_path))
    return result, _task_runs_since(started)


def test_pipeline_runs_every_stage_and_reports(config_path, first_run):
    result, runs = first_run
    assert list(result) == ["preprocess", "train-vae", "encode-latents", "train-diffusion", "evaluate"]
    assert result["preprocess"]["ok"] == 5 and result["preprocess"]["quarantined"] == 0
    assert result["train-diffusion"]["step"] == 4
    work = yaml.safe_load(config_path.read_text())["paths"]["work"]
    for kind in ("vae", "diffusion"):
        for name in ("last.pt", "best.pt"):
            assert (config_path.parent / "work" / "checkpoints" / kind / name).is_file()

    report = result["evaluate"]
    assert report["report_dir"].startswith(str(work))
    metrics = load_metrics(f"{report['report_dir']}/metrics.json")
    assert metrics["window"] == [40.0, 400.0] and METHODS <= set(metrics["methods"])
    test_ids = set(metrics["methods"]["cubic"]["per_case"])
    assert len(test_ids) == report["cases"] >= 1
    for method in METHODS:
        entry = metrics["methods"][method]
        assert 5.0 < entry["psnr"] < 60.0 and 0.0 < entry["ssim"] <= 1.0
        assert set(entry["per_case"]) == test_ids
    figures = ("best_case.png", "worst_case.png") if len(test_ids) > 1 else ("best_case.png",)
    for name in ("report.md", *figures):
        assert (config_path.parent / report["report_dir"] / name).is_file()
    history = (config_path.parent / "work" / "reports" / "history.jsonl").read_text().splitlines()
    assert len(history) == 1 and json.loads(history[0])["run"] == report["run"]
    assert json.loads(history[0])["case_ids"] == sorted(test_ids)  # which cases each run scored
    # Everything that works ran for real the first time (train-diffusion reuses the VAE
    # checkpoint that encode-latents resolved: that one lookup is cached).
    computed = _states(runs, ("ingest-", "train-", "encode-", "scale-factor", "score-cases"))
    assert len(computed) == 5 + 2 + 5 + 1 + 1, sorted(computed)
    for name, states in computed.items():
        assert states == ["Completed"], name


def test_second_run_redoes_only_what_changed(config_path, first_run, prefect_harness):
    from flows.pipeline import pipeline

    first, _ = first_run
    # Only a diffusion setting changes: ingestion, the VAE and the latents are all cache hits;
    # training resumes from step 4, and the new checkpoint is evaluated (`last`: whether steps
    # 5-6 validate better than step 4, so that `best` moves too, depends on float sums).
    changed = ["train_diffusion.steps=6", "evaluate.checkpoint=last"]
    started = time.time()
    second = pipeline(config=str(config_path), overrides=changed)
    runs = _task_runs_since(started)
    upstream = _states(runs, UPSTREAM)
    assert len(upstream) == len(_states(first_run[1], UPSTREAM))
    for name, states in upstream.items():
        assert states == ["Cached"], name
    assert list(_states(runs, ("train-diffusion",)).values()) == [["Completed"]]
    assert second["train-diffusion"]["resumed_from"] == 4
    assert second["train-diffusion"]["step"] == 6
    assert second["evaluate"]["run"] != first["evaluate"]["run"]

    # Nothing changed: no task that does work runs again, and the report is the same.
    started = time.time()
    third = pipeline(config=str(config_path), overrides=changed)
    runs = _task_runs_since(started)
    for name, states in _states(runs, WORK).items():
        assert states == ["Cached"], name
    assert third["evaluate"]["report_dir"] == second["evaluate"]["report_dir"]
    history = (config_path.parent / "work" / "reports" / "history.jsonl").read_text().splitlines()
    assert len(history) == 2


def test_infer_flow_writes_every_case_and_caches_them(config_path, first_run, tmp_path, prefect_harness):
    import shutil

    import nibabel as nib

    from flows.infer import infer

    cases = sorted((config_path.parent / "cases").rglob("*.zip"))[:2]
    new = tmp_path / "new"
    new.mkdir()
    for case in cases:
        shutil.copy(case, new / case.name)
    (new / "broken.zip").write_bytes(b"not a zip")
    overrides = [f"infer.input={new}", f"infer.output={tmp_path / 'thin'}", "infer.sample_steps=2", "infer.device=cpu"]

    started = time.time()
    result = infer(config=str(config_path), overrides=overrides)
    assert (result["ok"], result["failed"]) == (2, 1)
    by_id = {r["id"]: r for r in result["cases"]}
    assert by_id["broken"]["reason"] == "corrupt zip"
    for case in cases:
        image = nib.load(tmp_path / "thin" / f"{case.stem}.nii.gz")
        assert image.shape[2] == by_id[case.stem]["n_thin"] == 5 * by_id[case.stem]["n_thick"]
        assert image.header.get_zooms()[2] == pytest.approx(1.0)
    assert {name: states for name, states in _task_runs_since(started).items() if name.startswith("infer-")} == {
        f"infer-{case.stem}": ["Completed"] for case in [*cases, new / "broken.zip"]}

    # Again: the written cases are cache hits; the broken one is tried again (it has no output).
    started = time.time()
    infer(config=str(config_path), overrides=overrides)
    states = {name: s for name, s in _task_runs_since(started).items() if name.startswith("infer-")}
    assert states == {**{f"infer-{case.stem}": ["Cached"] for case in cases}, "infer-broken": ["Completed"]}


def test_editing_a_sampler_reruns_evaluate_and_infer_and_an_unrelated_module_does_not(
    config_path, first_run, tmp_path, prefect_harness, monkeypatch
):
    import shutil

    from ctdiff import fingerprint
    from flows.evaluate import evaluate
    from flows.infer import infer

    new = tmp_path / "new"
    new.mkdir()
    shutil.copy(sorted((config_path.parent / "cases").rglob("*.zip"))[0], new)
    overrides = [f"infer.input={new}", f"infer.output={tmp_path / 'thin'}", "infer.sample_steps=2", "infer.device=cpu"]
    source = fingerprint._source

    def run_both(edited: str | None) -> dict[str, list[str]]:
        # An "edit" of a module's file, as the cache keys read it (a trailing comment).
        monkeypatch.setattr(fingerprint, "_source", lambda name: source(name) + (b"\n# edited\n" if name == edited else b""))
        started = time.time()
        evaluate(config=str(config_path))
        infer(config=str(config_path), overrides=overrides)
        return _states(_task_runs_since(started), ("score-cases", "infer-"))

    run_both(None)
    assert set(sum(run_both("ctdiff.phantom").values(), [])) == {"Cached"}
    assert set(sum(run_both("ctdiff.samplers").values(), [])) == {"Completed"}


def test_evaluate_refuses_the_cases_a_checkpoint_trained_on(config_path, first_run, prefect_harness, capsys):
    from flows.cli import main

    code = main(["evaluate", "--config", str(config_path), "--set", "evaluate.split=train"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert last.startswith("ctdiff: evaluate: error: ") and "was trained on" in last and "evaluate.split=test" in last
