"""The one training loop of the VAE and the diffusion model, and what they share beside it:
mixed precision, throttled progress, DDP ranks.

A model plugs in as a `TrainingRun` (its step, its validation, its checkpoint keys, its random
generators); `Trainer` owns everything else. Cadence: validate every `val_every` steps and at
the last step; write `last.pt` (and `loss.png`) every `checkpoint_every` steps and at the last
step; write `best.pt` whenever validation PSNR beats the best so far. `steps: 0` records the
initial (e.g. pretrained) weights with one validation. Checkpoints are written atomically and
durably (ctdiff.checkpoint), and carry the config and the case ids trained and validated on.

Resume is exact in one process: `last.pt` holds the step, the history and the state of every
generator the run draws from, so a run killed after a checkpoint and started again reaches
bit-identical weights (CPU). Under torchrun (WORLD_SIZE > 1) one saved state cannot serve every
rank: each rank's generators are seeded from (seed, rank, step) at the start and on resume
instead. Only rank 0 validates and writes; the others wait for it at a barrier, bounded by the
process group's timeout (`ddp_timeout_min`).
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ctdiff.checkpoint import load_checkpoint, save_checkpoint
from ctdiff.config import Config, TrainDiffusionConfig, TrainVaeConfig
from ctdiff.devices import resolve_device
from ctdiff.errors import UsageError
from ctdiff.plots import plot_training_curves
from ctdiff.store import CaseStore
from ctdiff.threads import ThreadGovernor

Progress = Callable[[dict], None]
TrainConfig = TrainVaeConfig | TrainDiffusionConfig
_PROGRESS_INTERVAL_S = 0.5  # at most ~2 progress reports a second, plus one per validation/checkpoint
_OUTPUTS = ("last.pt", "best.pt", "loss.png")


@dataclass
class Rng:
    """A random generator a run draws from: saved in `last.pt`, restored (one process) or
    re-seeded from (seed, rank, step) (DDP ranks) on resume."""

    name: str
    get_state: Callable[[], Any]
    set_state: Callable[[Any], None]
    reseed: Callable[[int, int, int], None]  # (seed, rank, step)


def torch_rngs() -> list[Rng]:
    """torch's global generators: the CPU one and (seeded along with it) CUDA's."""

    def set_cuda(state: Any) -> None:
        if state is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state)

    return [
        Rng("torch", torch.get_rng_state, torch.set_rng_state,
            lambda seed, rank, step: torch.manual_seed(seed * 1000 + rank + step)),
        Rng("cuda", lambda: torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None, set_cuda,
            lambda seed, rank, step: None),  # torch.manual_seed above seeds every CUDA device too
    ]


def numpy_rng(name: str, sampler: Any) -> Rng:
    """The numpy generator of a patch or window sampler (`rng_state` / `set_rng_state`)."""

    def reseed(seed: int, rank: int, step: int) -> None:
        sampler.set_rng_state(np.random.default_rng([seed, rank, step]).bit_generator.state)

    return Rng(name, sampler.rng_state, sampler.set_rng_state, reseed)


def generator_rng(name: str, generator: torch.Generator) -> Rng:
    return Rng(name, generator.get_state, generator.set_state,
               lambda seed, rank, step: generator.manual_seed(seed * 1000 + rank + step))


class TrainingRun(Protocol):
    """What a model brings to `Trainer`: built, on its device, with fresh weights."""

    title: str  # of the loss plot
    rngs: list[Rng]  # every generator its steps draw from

    def load(self, checkpoint: dict) -> None:
        """Weights and optimiser states from a `last.pt` of this run."""

    def train_step(self, step: int) -> dict:
        """One optimiser step after `step` steps: its loss terms, "loss" among them."""

    def validate(self) -> dict:
        """{"val_psnr", "val_ssim"} on the run's val cases (rank 0 only)."""

    def payload(self) -> dict:
        """The model's own checkpoint keys (kind, preset, weights, optimiser states, ...)."""


def training_cases(store: CaseStore, train_ids: list[str], tc: TrainConfig, section: str) -> dict:
    """{"train_ids", "val_ids", "validate_on", "inplane_px"}: the cases a run trains and validates
    on, and their in-plane size [H, W] (None when they differ), as its checkpoints record them:
    evaluation and inference hold a model to the data it saw (ctdiff.provenance). UsageError
    naming the fix when validation is on an empty val split."""
    if tc.validate_on == "train":
        val_ids = list(train_ids)
    else:
        val_ids = store.ids(split="val")
        if not val_ids:
            raise UsageError(
                f"no val cases in {store.path}: set preprocess.split (e.g. --set preprocess.split.train=0.7 "
                f"--set preprocess.split.val=0.2) and run `ctdiff preprocess` again, or set "
                f"{section}.validate_on=train to validate on training cases"
            )
    sizes = {store.read(case_id, "thin", slice(0, 1)).shape[1:] for case_id in train_ids}  # one slice each
    return {
        "train_ids": sorted(train_ids), "val_ids": sorted(val_ids)[: tc.val_cases], "validate_on": tc.validate_on,
        "inplane_px": list(sizes.pop()) if len(sizes) == 1 else None,
    }


class Trainer:
    """Steps, cadence, best/last checkpoints, history, resume and progress of one run under
    `out_dir`. Construct it first: `resume` and `finished` tell the caller, before it builds
    anything, whether there is a `last.pt` to check and whether any training is left."""

    def __init__(self, out_dir: str | Path, config: Config, tc: TrainConfig):
        self.config, self.tc = config, tc
        out_dir = Path(out_dir)
        self.paths = {"last": out_dir / "last.pt", "best": out_dir / "best.pt", "loss_plot": out_dir / "loss.png"}
        # A write killed before its rename leaves its temporary file; no rank writes before all
        # have passed here (setup_distributed's rendezvous comes after), so none is a live one.
        for name in _OUTPUTS:
            for stray in out_dir.glob(f".{name}.*.tmp*"):
                stray.unlink(missing_ok=True)
        self.resume = load_checkpoint(self.paths["last"]) if self.paths["last"].is_file() else None
        self.step, self.best_psnr, self.history, self.resumed_from, self.latest_psnr = 0, -math.inf, [], None, None
        if self.resume is not None:
            resume = self.resume
            self.step, self.best_psnr, self.history = resume["step"], resume["best_val_psnr"], resume["history"]
            self.resumed_from = self.step
            self.latest_psnr = next((r["val_psnr"] for r in reversed(self.history) if r["val_psnr"] is not None), None)
        self.cases: dict | None = None

    @property
    def finished(self) -> bool:
        return self.resume is not None and self.step >= self.tc.steps

    def summary(self) -> dict:
        """{step, best_val_psnr, last, best, loss_plot (paths as str), resumed_from}."""
        return {
            "step": self.step,
            "best_val_psnr": self.best_psnr if math.isfinite(self.best_psnr) else None,
            **{name: str(path) for name, path in self.paths.items()},
            "resumed_from": self.resumed_from,
        }

    def run(self, training: TrainingRun, dist: Distributed, cases: dict, progress: Progress | None = None) -> dict:
        """Train `training` to `steps` (from `last.pt` when there is one) on `cases` (as
        `training_cases` gives them); returns `summary()`."""
        tc, self.cases = self.tc, cases
        if self.resume is not None:
            training.load(self.resume)
            for rng in training.rngs:
                if dist.enabled:
                    rng.reseed(tc.seed, dist.rank, self.step)
                else:
                    rng.set_state(self.resume["rng"][rng.name])
            self.resume = None  # its weights are loaded: free the memory
        elif dist.enabled:  # DDP has synced the weights; each rank draws its own patches and noise
            for rng in training.rngs:
                rng.reseed(tc.seed, dist.rank, 0)

        reporter = StepReporter(progress if dist.is_main else None, self.step, tc.steps)
        # One intra-op thread per CPU that is ours and free: on a busy machine, threads beyond
        # that stall every step at their barriers (benchmarks/contention.py).
        governor = ThreadGovernor(processes=dist.world_size)
        while self.step < tc.steps:
            governor()
            row = training.train_step(self.step)
            self.step += 1
            row = {"step": self.step, **row, "val_psnr": None, "val_ssim": None}
            self.history.append(row)
            validate = self.step % tc.val_every == 0 or self.step == tc.steps
            checkpoint = self.step % tc.checkpoint_every == 0 or self.step == tc.steps
            if validate or checkpoint:
                self._validate_and_save(training, dist, row, validate, checkpoint)
            reporter(self.step, row["loss"], self.latest_psnr, force=validate or checkpoint)
        if tc.steps == 0:  # nothing to train: record the initial weights with one validation
            row = {"step": 0, "loss": None, "val_psnr": None, "val_ssim": None}
            self.history.append(row)
            self._validate_and_save(training, dist, row, validate=True, checkpoint=True)
            reporter(0, None, self.latest_psnr, force=True)
        return self.summary()

    def _validate_and_save(
        self, training: TrainingRun, dist: Distributed, row: dict, validate: bool, checkpoint: bool
    ) -> None:
        """Rank 0 validates (into `row`, already in the history) and writes; the others wait."""
        if dist.is_main:
            if validate:
                row.update(training.validate())
                self.latest_psnr = row["val_psnr"]
                if row["val_psnr"] > self.best_psnr:
                    self.best_psnr = row["val_psnr"]
                    self._save(training, "best")
            if checkpoint:
                self._save(training, "last")
                plot_training_curves(self.history, self.paths["loss_plot"], title=training.title)
        dist.barrier()

    def _save(self, training: TrainingRun, name: str) -> None:
        save_checkpoint(self.paths[name], {
            **training.payload(),
            "step": self.step, "best_val_psnr": self.best_psnr, "history": self.history,
            "rng": {rng.name: rng.get_state() for rng in training.rngs},
            "config": self.config.model_dump(mode="json"),
            "data": self.cases,
        })


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


def setup_distributed(tc: TrainConfig) -> tuple[Distributed, torch.device]:
    """The process group of a torchrun rank (NCCL on CUDA, gloo on the CPU) and its device, or
    one process on `tc.device`. A collective (a barrier, a gradient all-reduce) that waits past
    `tc.ddp_timeout_min` fails the run instead of hanging it."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(tc.device)
    if world_size <= 1:
        return Distributed(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():  # torchrun's env:// rendezvous
        torch.distributed.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=tc.ddp_timeout_min),
        )
    return Distributed(rank, world_size), device
