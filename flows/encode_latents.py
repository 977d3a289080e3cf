"""Flow `encode-latents`: every ok case's thick and thin volumes into the latent cache."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from ctdiff.config import load_config
from ctdiff.store import CaseStore
from tasks.progress import Progress
from tasks.vae import (
    device_name,
    encode_case,
    latent_root,
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
    vae = resolve_vae_checkpoint(cfg)
    root = str(latent_root(cfg))
    device = device_name(cfg.encode.device)
    window = cfg.preprocess.window.as_pair()
    prepare_latent_store(root, vae, window)
    summaries = []
    with Progress(len(ids), "case", "encode-latents") as progress:
        for case_id in ids:
            summaries.append(
                encode_case(case_id, str(cfg.paths.store), root, vae, window, cfg.encode.chunk_slices, device)
            )
            progress.advance(case=case_id)
    train_ids = store.ids(split="train") or ids
    scale = scale_factor(root, vae, train_ids)
    latent_dir = str(Path(root) / vae["digest"])
    report_latents(summaries, latent_dir, scale)
    logger.info("encoded %d cases into %s (scale factor %.4f)", len(ids), latent_dir, scale)
    return {"latents": latent_dir, "cases": len(ids), "scale_factor": scale, "vae": vae["path"]}
