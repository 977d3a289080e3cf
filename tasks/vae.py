"""Prefect tasks over the VAE: training (resumable) and the latent cache (per case, cached)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from ctdiff import latents
from ctdiff.autoencoder import PRESETS
from ctdiff.checkpoint import checkpoint_digest, load_vae, vae_preset
from ctdiff.config import Config
from ctdiff.errors import UsageError
from ctdiff.distributed import train
from ctdiff.fingerprint import code_version, file_digest
from ctdiff.layout import WorkLayout
from ctdiff.store import CaseStore
from ctdiff.threads import ThreadGovernor
from tasks.progress import Progress, training_reporter
from tasks.training import (
    KeyedCache,
    OutputCache,
    file_state_key,
    finished_checkpoint,
    is_transient,
    training_key,
    training_task,
)


def _vae_training_key(inputs: dict[str, Any]) -> str:
    config: Config = inputs["config"]
    store = CaseStore(config.paths.store)
    data = {split: [store.case_key(i) for i in store.ids(split=split)] for split in ("train", "val")}
    sections = {
        "vae": config.vae.model_dump(mode="json"),
        "train_vae": config.train_vae.model_dump(mode="json"),
        "window": config.preprocess.window.as_pair(),
        "base": config.diffusion.base,  # what the VAE learns: images, or residuals over this base
        "pretrained": file_digest(config.vae.pretrained) if config.vae.pretrained else None,
    }
    return training_key("vae", sections, data, code_version("ctdiff.train_vae"))


def _vae_finished(inputs: dict[str, Any], key: str) -> bool:
    config: Config = inputs["config"]
    return finished_checkpoint(WorkLayout.of(config).checkpoint("vae", "last"), config.train_vae.steps)


@training_task("train-vae", key_fn=_vae_training_key, done_fn=_vae_finished)
def train_vae_task(config: Config) -> dict:
    """Train (or resume, or adopt pretrained weights); returns paths and the best val PSNR.

    With more than one training process (`train_vae.processes`, or one per visible GPU), the
    training runs under torchrun (DDP) in child processes; this task waits and relays progress.
    """
    with Progress(config.train_vae.steps, "step", "train-vae") as bar:
        out_dir = WorkLayout.of(config).checkpoint_dir("vae")
        summary = train("vae", config, out_dir, {"store": str(config.paths.store)}, training_reporter(bar))
    summary = {k: str(v) if isinstance(v, Path) else v for k, v in summary.items()}
    create_markdown_artifact(
        key="train-vae",
        markdown=(
            f"**VAE `{config.vae.preset}`** at step {summary['step']}: best val PSNR "
            f"{summary['best_val_psnr']:.2f} dB\n\n- best: `{summary['best']}`\n- last: `{summary['last']}`\n"
            f"- loss curve: `{summary['loss_plot']}`"
        ),
    )
    return summary


def _vae_checkpoint_path(config: Config) -> Path:
    return WorkLayout.of(config).checkpoint("vae", config.encode.checkpoint)


@task(
    name="resolve-vae-checkpoint",
    cache_policy=KeyedCache(
        key_fn=lambda inputs: file_state_key("vae-formulation", _vae_checkpoint_path(inputs["config"]))
    ),
    persist_result=True,
)
def resolve_vae_checkpoint(config: Config) -> dict:
    """The VAE checkpoint to encode with (`encode.checkpoint`: best | last | a path): {path,
    digest, base}, refused unless it was trained for `diffusion.base`."""
    from ctdiff.checkpoint import load_checkpoint
    from ctdiff.residual import vae_base

    path = _vae_checkpoint_path(config)
    if not path.is_file():
        raise ValueError(f"encode.checkpoint: no VAE checkpoint at {path}; run `ctdiff train-vae` first")
    payload = load_checkpoint(path)
    base = vae_base(payload)
    trained_window = payload["config"]["preprocess"]["window"]
    if [trained_window["center_hu"], trained_window["width_hu"]] != config.preprocess.window.as_pair():
        raise UsageError(
            f"encode.checkpoint: {path} was trained in window {trained_window['center_hu']:g}/"
            f"{trained_window['width_hu']:g} HU, but preprocess.window is {config.preprocess.window.center_hu:g}/"
            f"{config.preprocess.window.width_hu:g} HU; train the VAE with this window (another paths.work)"
        )
    if base != config.diffusion.base:
        raise ValueError(
            f"encode.checkpoint: {path} is a VAE for diffusion.base={base!r}, but the config says "
            f"{config.diffusion.base!r}; run `ctdiff train-vae` with this config (another paths.work)"
        )
    return {"path": str(path), "digest": checkpoint_digest(path), "base": base}


@lru_cache(maxsize=2)
def _model(path: str, digest: str, device: str):
    # One load per worker process and checkpoint, not one per case.
    return load_vae(path, device)[0]


def _latent_key(inputs: dict[str, Any]) -> str:
    """The case store entry's key + VAE digest + window + chunking."""
    case_key = CaseStore(inputs["store_path"]).case_key(inputs["case_id"])
    vae = inputs["vae"]
    return latents.latent_key(case_key, vae["digest"], inputs["window"], inputs["chunk_slices"], vae["base"])


def _encoded(inputs: dict[str, Any], key: str) -> bool:
    return latents.LatentStore(Path(inputs["latent_root"]), inputs["vae"]["digest"]).case_key(inputs["case_id"]) == key


_threads = ThreadGovernor()


@task(
    name="encode-case",
    task_run_name="encode-{case_id}",
    cache_policy=OutputCache(key_fn=_latent_key, done_fn=_encoded),
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=is_transient,
    persist_result=True,
)
def encode_case(
    case_id: str, store_path: str, latent_root: str, vae: dict, window: list[float], chunk_slices: int, device: str
) -> dict:
    _threads()  # one per CPU free now, re-checked every half minute across cases
    case_store = CaseStore(store_path)
    key = latents.latent_key(case_store.case_key(case_id), vae["digest"], window, chunk_slices, vae["base"])
    model = _model(vae["path"], vae["digest"], device)
    latent_store = latents.LatentStore(Path(latent_root), vae["digest"])
    return latents.encode_case(
        case_store, case_id, model, latent_store, tuple(window), chunk_slices, device, key, vae["base"]
    )


@task(name="prepare-latent-store")
def prepare_latent_store(latent_root: str, vae: dict, window: list[float]) -> None:
    """Create the latent store for this checkpoint (or reset it for a new window), clear staging."""
    preset = vae_preset(vae["path"])  # the network is not built: a cached rerun needs no model
    latents.LatentStore(Path(latent_root), vae["digest"]).create(preset, PRESETS[preset].factors, window, vae["base"])


def _scale_factor_key(inputs: dict[str, Any]) -> str:
    store = latents.LatentStore(Path(inputs["latent_root"]), inputs["vae"]["digest"])
    return store.scale_factor_key(inputs["train_ids"])


def _scale_factor_recorded(inputs: dict[str, Any], key: str) -> bool:
    """The store holds a scale factor computed from exactly these train latents."""
    attrs = latents.LatentStore(Path(inputs["latent_root"]), inputs["vae"]["digest"]).root_attrs()
    return attrs.get("scale_factor") is not None and attrs.get("scale_factor_key") == key


@task(
    name="scale-factor",
    cache_policy=OutputCache(key_fn=_scale_factor_key, done_fn=_scale_factor_recorded),
    persist_result=True,
)
def scale_factor(latent_root: str, vae: dict, train_ids: list[str]) -> float:
    """1/std of the train cases' thin latents, recorded in the latent store (with their key)."""
    store = latents.LatentStore(Path(latent_root), vae["digest"])
    value = latents.compute_scale_factor(store, train_ids)
    store.set_scale_factor(value, key=store.scale_factor_key(train_ids))
    return value


@task(name="report-latents")
def report_latents(summaries: list[dict], latent_dir: str, scale: float) -> None:
    create_table_artifact(key="encode-latents", table=summaries, description=f"Latents in {latent_dir}")
    create_markdown_artifact(
        key="encode-latents-summary",
        markdown=f"**{len(summaries)} cases** encoded in `{latent_dir}`; scale factor {scale:.4f}",
    )

