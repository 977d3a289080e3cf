"""Checkpoints: atomic writes, `weights_only=True` loads, and the VAE built back from one.

A checkpoint is a dict of tensors and plain Python values only (no pickled classes), so it
loads with `torch.load(weights_only=True)`. It always carries the resolved config it was
trained with, so a checkpoint alone is enough to rebuild its model.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ctdiff.atomic import atomic_path

if TYPE_CHECKING:  # MONAI's import only where a VAE is built
    from ctdiff.autoencoder import CtAutoencoder


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write to a temporary file beside `path`, fsync it, rename it onto `path` and fsync the
    folder: a killed process (or a power loss) leaves the old checkpoint or the new one, never
    half of one. A temporary file left by a kill is removed when training starts again
    (ctdiff.training_loop.Trainer)."""
    with atomic_path(path, durable=True) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """The checkpoint dict; with `mmap`, its tensors are mapped from the file, read only when used."""
    return torch.load(Path(path), map_location=map_location, weights_only=True, mmap=mmap)


def checkpoint_digest(path: str | Path) -> str:
    """Content hash of a checkpoint's model weights: what keys caches built from it (latents)."""
    payload = load_checkpoint(path)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str(payload.get("preset")).encode())
    for key, tensor in sorted(payload["model"].items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _vae_payload(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    payload = load_checkpoint(path, mmap=mmap)
    if payload.get("kind") != "vae":
        raise ValueError(f"{path} is not a ctdiff VAE checkpoint (kind={payload.get('kind')!r})")
    return payload


def vae_preset(path: str | Path) -> str:
    """The autoencoder preset of a VAE checkpoint, its weights mapped but not read."""
    return _vae_payload(path, mmap=True)["preset"]


def load_vae(path: str | Path, device: str | torch.device = "cpu") -> tuple[CtAutoencoder, dict[str, Any]]:
    """The autoencoder of a VAE checkpoint, in eval mode on `device`, with the checkpoint dict."""
    payload = _vae_payload(path)
    from ctdiff.autoencoder import CtAutoencoder

    model = CtAutoencoder(payload["preset"])
    model.net.load_state_dict(payload["model"])
    return model.to(device).eval(), payload
