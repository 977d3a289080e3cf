"""Flow `encode-latents`: every ok case's thick and thin volumes into the latent cache."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from ctdiff.config import load_config
from ctdiff.devices import resolve_device
from ctdiff.errors import UsageError
from ctdiff.layout import WorkLayout
from ctdiff.store import CaseStore
from tasks.progress import Progress
from tasks.vae import (
    encode_case,
    prepare_latent_store,
    report_latents,
    resolve_vae_checkpoint,
    scale_factor,
)


@flow(name="encode-latents")
def encode_latents(config: str | None = None, overrides: list[str] | None = None) -> dict:
    """Encode with the VAE checkpoint `encode.checkpoint` into `paths.work/latents/<digest>/`.

    Cases run one after another: one model on one device does them fastest, and the per-case
    cache makes a re-run cost nothing.
    """
    cfg = load_config(config, overrides or [])
    logger = get_run_logger()
    store = CaseStore(cfg.paths.store)
    ids = store.ids()
    if not ids:
        raise ValueError(f"no ok cases in {cfg.paths.store}; run `ctdiff preprocess` first")
    train_ids = store.ids(split="train")
    if not train_ids:  # the scale factor is a training statistic: never taken from val or test cases
        raise UsageError(
            f"no train cases in {cfg.paths.store}: set preprocess.split (e.g. --set preprocess.split.train=0.8) "
            "and run `ctdiff preprocess` again"
        )
    vae = resolve_vae_checkpoint(cfg)
    root = str(WorkLayout.of(cfg).latents)
    device = str(resolve_device(cfg.encode.device))
    window = cfg.preprocess.window.as_pair()
    prepare_latent_store(root, vae, window)
    summaries = []
    with Progress(len(ids), "case", "encode-latents") as progress:
        for case_id in ids:
            summaries.append(
                encode_case(case_id, str(cfg.paths.store), root, vae, window, cfg.encode.chunk_slices, device)
            )
            progress.advance(case=case_id)
    scale = scale_factor(root, vae, train_ids)
    latent_dir = str(Path(root) / vae["digest"])
    report_latents(summaries, latent_dir, scale)
    logger.info("encoded %d cases into %s (scale factor %.4f)", len(ids), latent_dir, scale)
    return {"latents": latent_dir, "cases": len(ids), "scale_factor": scale, "vae": vae["path"]}
