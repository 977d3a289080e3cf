"""Flow `pipeline`: every stage in order, each a sub-flow that reuses what is cached."""

from __future__ import annotations

from prefect import flow

from flows.encode_latents import encode_latents
from flows.evaluate import evaluate
from flows.preprocess import preprocess
from flows.train_diffusion import train_diffusion
from flows.train_vae import train_vae

STAGES = ("preprocess", "train-vae", "encode-latents", "train-diffusion", "evaluate")


@flow(name="pipeline")
def pipeline(config: str | None = None, overrides: list[str] | None = None) -> dict:
    """preprocess → train-vae → encode-latents → train-diffusion → evaluate.

    Each stage's work is cached on what determines it, so a re-run after changing only the
    diffusion settings redoes neither ingestion, nor the VAE, nor the latents.
    """
    params = {"config": config, "overrides": overrides or []}
    results = {}
    for name, stage in zip(STAGES, (preprocess, train_vae, encode_latents, train_diffusion, evaluate)):
        results[name] = stage(**params)
    return results
