"""Flow `train-vae`: the autoencoder, trained on the case store's train split (resumable)."""

from __future__ import annotations

from prefect import flow

from ctdiff.config import load_config
from tasks.vae import train_vae_task


@flow(name="train-vae", retries=1, retry_delay_seconds=30)
def train_vae(config: str | None = None, overrides: list[str] | None = None) -> dict:
    """Train the VAE of `vae.preset` (or adopt `vae.pretrained` with train_vae.steps=0).

    A retried or re-run flow resumes from `checkpoints/vae/last.pt`.
    """
    cfg = load_config(config, overrides or [])
    return train_vae_task(cfg)
