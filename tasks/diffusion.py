"""Prefect tasks over the diffusion model: training (resumable, cached when finished)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact

from ctdiff.config import Config
from ctdiff.fingerprint import code_version
from ctdiff.latents import LatentStore
from ctdiff.layout import WorkLayout
from ctdiff.store import CaseStore
from tasks.progress import Progress, training_reporter
from tasks.training import finished_checkpoint, training_key, training_task


def latent_store_of(config: Config, vae: dict) -> LatentStore:
    return LatentStore(WorkLayout.of(config).latents, vae["digest"])


def _training_key(inputs: dict[str, Any]) -> str:
    config: Config = inputs["config"]
    latents = latent_store_of(config, inputs["vae"])
    data = {
        "vae": inputs["vae"]["digest"],
        "scale_factor": latents.scale_factor,
        "cases": {case_id: latents.case_key(case_id) for case_id in latents.ids()},
        "splits": {split: CaseStore(config.paths.store).ids(split=split) for split in ("train", "val")},
    }
    sections = {
        "diffusion": config.diffusion.model_dump(mode="json"),
        "train_diffusion": config.train_diffusion.model_dump(mode="json"),
    }
    return training_key("diffusion", sections, data, code_version("ctdiff.train_diffusion"))


def _finished(inputs: dict[str, Any], key: str) -> bool:
    config: Config = inputs["config"]
    return finished_checkpoint(WorkLayout.of(config).checkpoint("diffusion", "last"), config.train_diffusion.steps)


@training_task("train-diffusion", key_fn=_training_key, done_fn=_finished)
def train_diffusion_task(config: Config, vae: dict) -> dict:
    """Train (or resume) the latent diffusion model on the latents of VAE `vae` ({path, digest})."""
    from ctdiff.distributed import train

    latents = latent_store_of(config, vae)
    if not latents.ids():
        raise ValueError(f"no latents in {latents.path}; run `ctdiff encode-latents` first")
    layout = WorkLayout.of(config)
    data = {"store": str(config.paths.store), "latent_root": str(layout.latents),
            "vae_digest": vae["digest"], "vae_checkpoint": vae["path"]}
    with Progress(config.train_diffusion.steps, "step", "train-diffusion") as bar:
        summary = train("diffusion", config, layout.checkpoint_dir("diffusion"), data, training_reporter(bar))
    summary = {k: str(v) if isinstance(v, Path) else v for k, v in summary.items()}
    best = summary.get("best_val_psnr")
    fit = f": best val PSNR {best:.2f} dB" if best is not None else ""
    create_markdown_artifact(
        key="train-diffusion",
        markdown=(
            f"**Diffusion `{config.diffusion.preset}` ({config.diffusion.sampler})** at step {summary['step']}{fit}"
            f"\n\n- best: `{summary['best']}`\n- last: `{summary['last']}`\n- loss curve: `{summary['loss_plot']}`"
        ),
    )
    return summary
