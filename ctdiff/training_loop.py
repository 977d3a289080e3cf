"""What the training loops (VAE, diffusion) share: mixed precision and throttled progress."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch

Progress = Callable[[dict], None]
_PROGRESS_INTERVAL_S = 0.5  # at most ~2 progress reports a second, plus one per validation/checkpoint


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for `precision` bf16, or auto on CUDA; otherwise fp32 (a no-op context)."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class StepReporter:
    """Calls `progress` at most every _PROGRESS_INTERVAL_S seconds, or when forced."""

    def __init__(self, progress: Progress | None, start_step: int, steps: int):
        self.progress, self.start_step, self.steps = progress, start_step, steps
        self.started = self.last = time.perf_counter()

    def __call__(self, step: int, loss: float | None, val_psnr: float | None, force: bool = False) -> None:
        now = time.perf_counter()
        if self.progress is None or (not force and now - self.last < _PROGRESS_INTERVAL_S):
            return
        self.last = now
        per_step = (now - self.started) / max(step - self.start_step, 1)
        self.progress({
            "step": step, "steps": self.steps, "loss": loss, "val_psnr": val_psnr,
            "seconds_per_step": per_step, "eta_s": per_step * (self.steps - step),
        })
