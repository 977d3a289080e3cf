"""What the training loops (VAE, diffusion) share: mixed precision, throttled progress, DDP ranks."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

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


# -- multi-GPU (torchrun) --------------------------------------------------------------------------


@dataclass
class Distributed:
    """This process's place under torchrun (WORLD_SIZE > 1), or a single process."""

    rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, module: nn.Module | None, device: torch.device) -> nn.Module | None:
        if module is None or not self.enabled:
            return module
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


def setup_distributed(device_setting: str) -> tuple[Distributed, torch.device]:
    """The process group of a torchrun rank (NCCL on CUDA, gloo on the CPU) and its device."""
    if device_setting == "auto":
        device_setting = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_setting)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():  # torchrun's env:// rendezvous
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank, world_size), device
