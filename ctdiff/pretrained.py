"""Adopting pretrained weights from a local file, refusing anything but an exact match.

NVIDIA's MAISI `autoencoder.pt` is a plain state dict; other releases wrap it under a key such
as `state_dict` or `unet_state_dict`, and training frameworks prefix keys with `module.` (DDP)
or `net.` (our wrapper). All are accepted; what is loaded is reported key by key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ctdiff.errors import WeightsMismatch

WRAPPER_KEYS = ("state_dict", "model", "unet_state_dict", "autoencoder", "model_state_dict")
_PREFIXES = ("module.", "net.", "autoencoder.")


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the network, not in the file
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the network
    mismatched: list[str] = field(default_factory=list)  # "key: file (shape) vs network (shape)"

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        return (
            f"{len(self.loaded)} loaded, {len(self.missing)} missing, {len(self.unexpected)} unexpected, "
            f"{len(self.mismatched)} shape-mismatched"
        )

    def first_problems(self, n: int = 3) -> str:
        problems = (
            [f"shape {m}" for m in self.mismatched]
            + [f"missing {k}" for k in self.missing]
            + [f"unexpected {k}" for k in self.unexpected]
        )
        more = f" (+{len(problems) - n} more)" if len(problems) > n else ""
        return "; ".join(problems[:n]) + more


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file (loaded with weights_only=True), unwrapped and unprefixed."""
    path = Path(path)
    if not path.is_file():
        raise WeightsMismatch(f"no such weights file {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle and zip errors of many types mean one thing here
        raise WeightsMismatch(f"{path} is not a loadable torch checkpoint ({type(exc).__name__})") from exc
    for key in WRAPPER_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsMismatch(f"{path} holds no state dict (expected tensors, or one under {WRAPPER_KEYS})")
    state = dict(obj)
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def compare(network: nn.Module, state: dict[str, torch.Tensor]) -> LoadReport:
    own = network.state_dict()
    report = LoadReport()
    for key, tensor in state.items():
        if key not in own:
            report.unexpected.append(key)
        elif own[key].shape != tensor.shape:
            report.mismatched.append(f"{key}: file {tuple(tensor.shape)} vs network {tuple(own[key].shape)}")
        else:
            report.loaded.append(key)
    report.missing = [k for k in own if k not in state]
    return report


def load_pretrained(network: nn.Module, path: str | Path, allow_partial: bool = False) -> LoadReport:
    """Load matching tensors into `network`; raise WeightsMismatch unless the match is complete
    (or `allow_partial`, which loads what fits and leaves the rest as initialised)."""
    state = read_state_dict(path)
    report = compare(network, state)
    if not report.loaded:
        raise WeightsMismatch(f"{path}: no tensor fits this network ({report.first_problems()})")
    if not report.complete and not allow_partial:
        raise WeightsMismatch(
            f"{path} does not match the network ({report.summary()}): {report.first_problems()}; "
            "choose the matching vae.preset, or set vae.allow_partial=true"
        )
    network.load_state_dict({k: state[k] for k in report.loaded}, strict=False)
    return report
