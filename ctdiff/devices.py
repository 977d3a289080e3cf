"""Choosing the torch device from a config value."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def resolve_device(setting: str) -> torch.device:
    """`auto` → cuda when present, else cpu; anything else as torch names it (`cuda:1`, `cpu`)."""
    import torch  # here: a command whose work is all cached never needs torch

    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {setting!r} requested but no CUDA device is available; use device=auto or cpu")
    return device
