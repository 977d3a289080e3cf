"""Flow `evaluate`: diffusion checkpoints against classical interpolation and the VAE ceiling."""

from __future__ import annotations

from prefect import flow, get_run_logger

from ctdiff.config import load_config
from tasks.evaluate import (
    case_ids,
    checkpoint_paths,
    digest_checkpoint,
    evaluation_key,
    report_artifacts,
    reports_dir,
    score_and_report,
)


@flow(name="evaluate")
def evaluate(config: str | None = None, overrides: list[str] | None = None) -> dict:
    """Score `evaluate.checkpoints` (default: the newest diffusion checkpoint) on the test split.

    An evaluation of the same checkpoint weights on the same cases with the same settings is
    reused from its report, so a nightly schedule costs nothing while nothing changed.
    """
    cfg = load_config(config, overrides or [])
    checkpoints = [digest_checkpoint(path) for path in checkpoint_paths(cfg)]
    ids = case_ids(cfg)
    key = evaluation_key(cfg, checkpoints, ids)
    run = key[:12]
    report = score_and_report(cfg, checkpoints, ids, key, str(reports_dir(cfg)), run)
    table = report_artifacts(report)
    get_run_logger().info("evaluation of %d cases:\n%s\nreport: %s", len(ids), table, report["report_dir"])
    return {**report, "table": table, "cases": len(ids)}
