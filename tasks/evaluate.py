"""Prefect tasks of `evaluate`: pick the checkpoints and cases, check them, score them (cached), report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from ctdiff.config import Config
from ctdiff.fingerprint import code_version, settings_digest
from ctdiff.layout import WorkLayout
from ctdiff.provenance import Provenance, common_window
from ctdiff.store import CaseStore
from tasks.progress import Progress
from tasks.training import OutputCache

MODEL = "model"  # SPEC §6 name of the (first) diffusion checkpoint's method
CEILING = "vae_ceiling"


def checkpoint_paths(config: Config) -> list[str]:
    """`evaluate.checkpoints` if named, else the one `evaluate.checkpoint` picks: best.pt (the
    default, as `ctdiff infer` examples use), last.pt, the newest *.pt, or a path."""
    if config.evaluate.checkpoints:
        return [str(Path(p)) for p in config.evaluate.checkpoints]
    layout = WorkLayout.of(config)
    choice = config.evaluate.checkpoint
    if choice == "newest":
        return [str(layout.newest_checkpoint("diffusion"))]
    path = layout.checkpoint("diffusion", choice)
    if not path.is_file():
        raise ValueError(f"evaluate.checkpoint: no diffusion checkpoint {path}; run `ctdiff train-diffusion` "
                         "first, or name one with --set evaluate.checkpoint=last|newest|PATH")
    return [str(path)]


def case_ids(config: Config) -> list[str]:
    store = CaseStore(config.paths.store)
    ids = config.evaluate.cases or store.ids(split=config.evaluate.split)
    missing = sorted(set(ids) - set(store.ids()))
    if missing:
        raise ValueError(f"evaluate.cases: not ok cases of {config.paths.store}: {', '.join(missing)}")
    if not ids:
        raise ValueError(
            f"evaluate.split: no ok {config.evaluate.split} cases in {config.paths.store}; "
            "name cases with --set evaluate.cases=[...] or choose another split"
        )
    return ids


@task(name="check-checkpoints")
def check_checkpoints(checkpoints: list[dict], ids: list[str], store_path: str) -> dict:
    """Refuse to score a checkpoint on cases it (or its VAE) trained on, or on a store made at
    another in-plane resolution; returns the window they were trained in and notes for the
    report (checkpoints whose training cases are not recorded)."""
    provenances = [Provenance.read(c["path"]) for c in checkpoints]
    window = common_window(provenances)
    store = CaseStore(store_path)
    for provenance in provenances:
        provenance.check_unseen(ids)
        for case_id in ids:
            provenance.check_case(case_id, store.read(case_id, "thin", slice(0, 1)))  # one slice: its shape
    notes = [
        f"training cases of `{p.path}` are not recorded (a checkpoint from before that record): "
        "it may have trained on the scored cases"
        for p in provenances if p.train_ids is None
    ]
    return {"window": list(window), "notes": notes}


def evaluation_key(config: Config, checkpoints: list[dict], ids: list[str], window: list[float]) -> str:
    """The checkpoints' weights, the cases' content, the window, the sampling settings and the
    code of this task and of every ctdiff module it imports (ctdiff.fingerprint)."""
    store = CaseStore(config.paths.store)
    return settings_digest(
        "evaluate",
        [c["digest"] for c in checkpoints],
        {case_id: store.case_key(case_id) for case_id in ids},
        [float(v) for v in window],
        {"seed": config.evaluate.seed, "samples": config.evaluate.samples},
        code_version(__name__),
    )


def _report_written(inputs: dict[str, Any], key: str) -> bool:
    return (Path(inputs["reports_root"]) / inputs["run"] / "metrics.json").is_file()


@task(
    name="score-cases",
    cache_policy=OutputCache(key_fn=lambda inputs: inputs["key"], done_fn=_report_written),
    persist_result=True,
)
def score_and_report(
    config: Config, checkpoints: list[dict], ids: list[str], checked: dict, key: str, reports_root: str, run: str
) -> dict:
    """Score every method on `ids` in the checkpoints' window (`checked`, from check_checkpoints),
    write the report under `reports_root/run`, append the history (with the scored case ids)."""
    from ctdiff.devices import resolve_device
    from ctdiff.evaluate import (
        append_history, baseline_predictors, ceiling_predictor, evaluate_cases, history_record, model_predictors,
        read_history,
    )
    from ctdiff.report import write_report
    from ctdiff.thin_slice import ThinSliceModel
    from ctdiff.threads import configure_threads

    configure_threads(adapt=True)  # the CPUs free now: sampling on a busy machine does not stall
    window = tuple(checked["window"])
    device = resolve_device(config.evaluate.device)
    models = [ThinSliceModel.load(c["path"], device) for c in checkpoints]
    predictors = dict(baseline_predictors(window))
    ceilings: set[str] = set()
    for i, (model, ckpt) in enumerate(zip(models, checkpoints)):
        suffix = "" if i == 0 else f"@{Path(ckpt['path']).stem}-{ckpt['digest'][:6]}"
        if model.vae_digest not in ceilings:  # one ceiling per VAE: checkpoints sharing one share it
            ceilings.add(model.vae_digest)
            predictors[CEILING + suffix] = ceiling_predictor(model, window)
        predictors.update(model_predictors(model, MODEL + suffix, window, config.evaluate.seed, config.evaluate.samples))
    start = time.perf_counter()
    with Progress(len(ids), "case", "evaluate") as progress:
        result = evaluate_cases(
            CaseStore(config.paths.store), ids, window, predictors, lambda case_id: progress.advance(case=case_id)
        )
    layout = WorkLayout.of(config)
    record = history_record(
        result, checkpoint=checkpoints[0]["path"], checkpoint_digest=checkpoints[0]["digest"],
        split=None if config.evaluate.cases else config.evaluate.split, time_iso=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        run=run, key=key, case_ids=sorted(ids), seconds=round(time.perf_counter() - start, 1),
    )
    append_history(layout.history, record)
    paths = write_report(
        Path(reports_root) / run, result, window, read_history(layout.history),
        title=f"ctdiff evaluation {run}", notes=_notes(models[0], config) + checked["notes"],
    )
    return {"run": run, "report_dir": str(Path(reports_root) / run), **{k: str(v) for k, v in paths.items()}}


def _notes(model, config: Config) -> list[str]:
    k = config.evaluate.samples
    slab = "with" if model.slab_consistency else "without"
    return [
        f"model: diffusion checkpoint `{model.path}` (digest {model.digest[:12]}), sampler "
        f"{model.sampler_name}, {model.sample_steps} steps; the mean of {k} sample(s) (seeds "
        f"{config.evaluate.seed}..{config.evaluate.seed + k - 1}), {slab} thick-slab consistency: what "
        f"`ctdiff infer` writes with infer.samples={k}",
        f"formulation: base `{model.base}`" + (
            " (the model generates the residual over this interpolation of the thick slices)"
            if model.base != "none" else " (the model generates the whole thin volume through its VAE)"
        ),
    ]


@task(name="report-evaluation")
def report_artifacts(report: dict) -> str:
    """The metrics table (Markdown and table artifacts) in the Prefect UI; returns the Markdown."""
    from ctdiff.evaluate import load_metrics
    from ctdiff.report import TABLE_KEY, findings, markdown_table, table_rows

    metrics = load_metrics(Path(report["report_dir"]) / "metrics.json")
    create_table_artifact(
        key="evaluate-metrics", table=table_rows(metrics), description=f"{TABLE_KEY}. Report in {report['report_dir']}",
    )
    markdown = markdown_table(metrics)
    found = "\n".join(f"- {line}" for line in findings(metrics))
    create_markdown_artifact(
        key="evaluate-report",
        markdown=f"## Evaluation\n\n{markdown}\n\n### Findings\n\n{found}\n\nReport: `{report['report_dir']}`",
    )
    return markdown
