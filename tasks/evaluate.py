"""Prefect tasks of `evaluate`: pick the checkpoints and cases, score them (cached), report."""

from __future__ import annotations

import time
from functools import lru_cache
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from ctdiff.checkpoint import checkpoint_digest
from ctdiff.config import Config
from ctdiff.fingerprint import code_version, settings_digest
from ctdiff.store import CaseStore
from tasks.diffusion import diffusion_dir
from tasks.progress import Progress
from tasks.training import KeyedCache, OutputCache, file_state_key

MODEL = "model"  # SPEC §6 name of the (first) diffusion checkpoint's method


def reports_dir(config: Config) -> Path:
    return Path(config.paths.work) / "reports"


def newest_checkpoint(folder: Path) -> Path:
    """The most recently written `*.pt` under `folder`: what a nightly re-evaluation scores."""
    candidates = sorted(folder.glob("*.pt"), key=lambda p: (p.stat().st_mtime_ns, p.name))
    if not candidates:
        raise ValueError(f"evaluate.checkpoints: no diffusion checkpoint in {folder}; run `ctdiff train-diffusion` first")
    return candidates[-1]


def _checkpoint_key(inputs: dict[str, Any]) -> str | None:
    return file_state_key("diffusion-checkpoint", Path(inputs["path"]))


@task(name="checkpoint-digest", cache_policy=KeyedCache(key_fn=_checkpoint_key), persist_result=True)
def digest_checkpoint(path: str) -> dict:
    """{path, digest}: the content hash keys the evaluation, so a rewritten file is scored again."""
    if not Path(path).is_file():
        raise ValueError(f"evaluate.checkpoints: no such checkpoint {path}")
    return {"path": path, "digest": checkpoint_digest(path)}


def checkpoint_paths(config: Config) -> list[str]:
    if config.evaluate.checkpoints:
        return [str(Path(p)) for p in config.evaluate.checkpoints]
    return [str(newest_checkpoint(diffusion_dir(config)))]


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


def evaluation_key(config: Config, checkpoints: list[dict], ids: list[str]) -> str:
    store = CaseStore(config.paths.store)
    return settings_digest(
        "evaluate",
        [c["digest"] for c in checkpoints],
        {case_id: store.case_key(case_id) for case_id in ids},
        config.preprocess.window.as_pair(),
        {"seed": config.evaluate.seed, "samples": config.evaluate.samples},
        _code_version(),
    )


@lru_cache(maxsize=1)
def _code_version() -> str:
    import ctdiff.evaluate
    import ctdiff.interpolate
    import ctdiff.metrics
    import ctdiff.report
    import ctdiff.residual
    import ctdiff.samplers
    import ctdiff.slab
    import ctdiff.sliding
    import ctdiff.thin_slice
    import ctdiff.train_vae

    return code_version(
        ctdiff.evaluate, ctdiff.interpolate, ctdiff.metrics, ctdiff.report, ctdiff.residual, ctdiff.samplers,
        ctdiff.slab, ctdiff.sliding, ctdiff.thin_slice, ctdiff.train_vae,
    )


def _report_written(inputs: dict[str, Any], key: str) -> bool:
    return (Path(inputs["reports_root"]) / inputs["run"] / "metrics.json").is_file()


@task(
    name="score-cases",
    cache_policy=OutputCache(key_fn=lambda inputs: inputs["key"], done_fn=_report_written),
    persist_result=True,
)
def score_and_report(
    config: Config, checkpoints: list[dict], ids: list[str], key: str, reports_root: str, run: str
) -> dict:
    """Score every method on `ids`, write the report under `reports_root/run`, append the history."""
    from ctdiff.devices import resolve_device
    from ctdiff.evaluate import (
        append_history, baseline_predictors, ceiling_predictor, evaluate_cases, model_predictors, read_history,
    )
    from ctdiff.report import write_report
    from ctdiff.thin_slice import ThinSliceModel

    window = tuple(config.preprocess.window.as_pair())
    device = resolve_device(config.evaluate.device)
    models = [ThinSliceModel.load(c["path"], device) for c in checkpoints]
    predictors = dict(baseline_predictors(window))
    predictors["vae_ceiling"] = ceiling_predictor(models[0], window)
    for i, (model, ckpt) in enumerate(zip(models, checkpoints)):
        name = MODEL if i == 0 else f"{MODEL}@{Path(ckpt['path']).stem}-{ckpt['digest'][:6]}"
        predictors.update(model_predictors(model, name, window, config.evaluate.seed, config.evaluate.samples))
    start = time.perf_counter()
    with Progress(len(ids), "case", "evaluate") as progress:
        result = evaluate_cases(
            CaseStore(config.paths.store), ids, window, predictors, lambda case_id: progress.advance(case=case_id)
        )
    history_path = reports_dir(config) / "history.jsonl"
    record = {
        "run": run, "key": key, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "checkpoint": checkpoints[0]["path"], "checkpoint_digest": checkpoints[0]["digest"],
        "n_cases": len(ids), "seconds": round(time.perf_counter() - start, 1),
        "means": {name: {k: m[k] for k in ("psnr", "ssim", "hist_w1_hu")} for name, m in result.means().items()},
        "in_between_means": {
            name: {k: m[k] for k in ("psnr", "ssim", "hist_w1_hu")} for name, m in result.means("in_between").items()
        },
    }
    append_history(history_path, record)
    paths = write_report(
        Path(reports_root) / run, result, window, read_history(history_path),
        title=f"ctdiff evaluation {run}", notes=_notes(models[0], config),
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
    from ctdiff.report import markdown_table, table_rows
    from ctdiff.evaluate import load_metrics

    metrics = load_metrics(Path(report["report_dir"]) / "metrics.json")
    create_table_artifact(key="evaluate-metrics", table=table_rows(metrics), description=f"Report in {report['report_dir']}")
    markdown = markdown_table(metrics)
    create_markdown_artifact(key="evaluate-report", markdown=f"{markdown}\n\nReport: `{report['report_dir']}`")
    return markdown
