"""Flow `train-diffusion`: the latent diffusion model on the latent cache (resumable)."""

from __future__ import annotations

from prefect import flow

from ctdiff.config import load_config
from tasks.diffusion import train_diffusion_task
from tasks.vae import resolve_vae_checkpoint


@flow(name="train-diffusion", retries=1, retry_delay_seconds=30)
def train_diffusion(config: str | None = None, overrides: list[str] | None = None) -> dict:
    """Train on the latents of the VAE checkpoint `encode.checkpoint` (run `encode-latents` first).

    A retried or re-run flow resumes from `checkpoints/diffusion/last.pt`; a finished run with
    unchanged settings and latents is not trained again.
    """
    cfg = load_config(config, overrides or [])
    vae = resolve_vae_checkpoint(cfg)
    return train_diffusion_task(cfg, vae)
