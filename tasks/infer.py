"""Prefect tasks of `infer`: one cached, retried task per case, and the summary artifact."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_table_artifact

from ctdiff.fingerprint import case_fingerprint, code_version, settings_digest
from tasks.training import OutputCache, is_transient


@lru_cache(maxsize=1)
def _model(path: str, digest: str, device: str):
    # One load per process and checkpoint, not one per case.
    from ctdiff.thin_slice import ThinSliceModel

    return ThinSliceModel.load(path, device)


def _case_key(inputs: dict[str, Any]) -> str:
    """The case's content, the checkpoint's weights, seed, steps, output format, and the code of
    this task and of every ctdiff module it imports (ctdiff.fingerprint)."""
    output = inputs["output"]
    return settings_digest(
        "infer", case_fingerprint(inputs["ref"]["path"]), inputs["checkpoint"]["digest"], inputs["seed"],
        inputs["sample_steps"], inputs["samples"], output.endswith((".nii", ".nii.gz")), code_version(__name__),
    )


def _output_written(inputs: dict[str, Any], key: str) -> bool:
    """The output, and with K > 1 samples its std map too (ctdiff.infer_io.std_output_path)."""
    from ctdiff.infer_io import std_output_path

    output = Path(inputs["output"])
    return output.exists() and (inputs["samples"] <= 1 or std_output_path(output).exists())


@task(
    name="infer-case",
    task_run_name="infer-{ref[id]}",
    cache_policy=OutputCache(key_fn=_case_key, done_fn=_output_written),
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=is_transient,
    persist_result=True,
)
def infer_case(
    ref: dict, output: str, checkpoint: dict, seed: int, sample_steps: int | None, device: str, samples: int = 1
) -> dict:
    """The thin volume of one case (`ref`: id, path, category) at `output`; a case that cannot be
    read gets status "failed" and its reason, so the others go on."""
    from ctdiff.cases import CaseRef
    from ctdiff.infer import infer_entry

    model = _model(checkpoint["path"], checkpoint["digest"], device)
    predictor = model.predictor(seed, sample_steps, samples=samples)
    return infer_entry(CaseRef(**ref), output, predictor, model.window, model.thin_mm, model.resolution)


@task(name="report-inference")
def report_inference(results: list[dict], output_dir: str) -> None:
    rows = [{k: r.get(k) for k in ("id", "status", "reason", "n_thick", "n_thin", "thin_mm", "seconds")} for r in results]
    create_table_artifact(key="infer-cases", table=rows, description=f"Thin volumes in {output_dir}")
