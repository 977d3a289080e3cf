"""Flow `evaluate`: diffusion checkpoints against classical interpolation and the VAE ceiling."""

from __future__ import annotations

from prefect import flow, get_run_logger

from ctdiff.config import load_config
from ctdiff.layout import WorkLayout
from tasks.checkpoints import digest_checkpoint
from tasks.evaluate import (
    case_ids,
    check_checkpoints,
    checkpoint_paths,
    evaluation_key,
    report_artifacts,
    score_and_report,
)


@flow(name="evaluate")
def evaluate(config: str | None = None, overrides: list[str] | None = None) -> dict:
    """Score `evaluate.checkpoint` (default best.pt; or `evaluate.checkpoints`) on the test split.

    A checkpoint is scored only on cases neither it nor its VAE trained on, in the window it was
    trained in. An evaluation of the same checkpoint weights on the same cases with the same
    settings and code is reused from its report, so a nightly schedule costs nothing while
    nothing changed.
    """
    cfg = load_config(config, overrides or [])
    checkpoints = [digest_checkpoint(path) for path in checkpoint_paths(cfg)]
    ids = case_ids(cfg)
    checked = check_checkpoints(checkpoints, ids, str(cfg.paths.store))
    key = evaluation_key(cfg, checkpoints, ids, checked["window"])
    run = key[:12]
    report = score_and_report(cfg, checkpoints, ids, checked, key, str(WorkLayout.of(cfg).reports), run)
    table = report_artifacts(report)
    get_run_logger().info("evaluation of %d cases:\n%s\nreport: %s", len(ids), table, report["report_dir"])
    return {**report, "table": table, "cases": len(ids)}
