"""Flow `infer`: thin volumes for a folder of new cases with a diffusion checkpoint."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from ctdiff.config import load_config
from ctdiff.devices import resolve_device
from ctdiff.infer import check_std_clashes, discover_inputs, output_path
from ctdiff.layout import WorkLayout
from tasks.checkpoints import digest_checkpoint
from tasks.infer import infer_case, report_inference
from tasks.progress import Progress


@flow(name="infer")
def infer(config: str | None = None, overrides: list[str] | None = None) -> dict:
    """Every case under `infer.input` through `infer.checkpoint` into `infer.output`.

    Cases run one after another on one model and device; each is cached on its content, the
    checkpoint's weights and the sampling settings, so a re-run only does new or changed cases.
    A case that cannot be read is reported as failed; the flow fails only when none succeeded.
    """
    cfg = load_config(config, overrides or [])
    ic = cfg.infer
    if ic.input is None or ic.output is None:
        raise ValueError("infer.input and infer.output: set both, e.g. --set infer.input=data/new --set infer.output=data/thin")
    checkpoint = digest_checkpoint(str(WorkLayout.of(cfg).checkpoint("diffusion", ic.checkpoint)))
    refs = discover_inputs(ic.input)
    if not refs:
        raise ValueError(f"infer.input: no cases (ZIP, DICOM folder, .nii or .nii.gz) in {ic.input}")
    output_dir = Path(ic.output)
    device = str(resolve_device(ic.device))
    outputs = [output_path(output_dir, ref.id, ic.format) for ref in refs]
    check_std_clashes(refs, outputs)
    results = []
    with Progress(len(refs), "case", "infer") as progress:
        for ref, out in zip(refs, outputs):
            results.append(infer_case(ref.to_dict(), str(out), checkpoint, ic.seed, ic.sample_steps, device, ic.samples))
            progress.advance(case=ref.id)
    report_inference(results, str(output_dir))
    counts = {status: sum(r["status"] == status for r in results) for status in ("ok", "failed")}
    get_run_logger().info("inferred %d of %d cases into %s", counts["ok"], len(results), output_dir)
    if counts["ok"] == 0:
        raise RuntimeError(f"no case could be inferred ({counts['failed']} failed); see the infer-cases artifact")
    return {"output": str(output_dir), **counts, "cases": results}
