"""Training on several processes (DDP), started with torchrun from one calling process.

A flow run is one process; DDP wants one process per GPU. `launch_training` bridges the two:
it writes a job (what to train, the resolved config, where the data is) beside the
checkpoints, runs

    python -m torch.distributed.run --standalone --nproc_per_node=N -m ctdiff.distributed JOB.json

whose ranks each run `ctdiff.train_vae.train_vae` or `ctdiff.train_diffusion.train_diffusion`
(DDP under torchrun's WORLD_SIZE; NCCL on GPUs, gloo on the CPU), relays rank 0's progress to
the caller and returns rank 0's summary. A rank that dies, or waits for the others longer than
`ddp_timeout_min`, fails the launch with a RuntimeError, so the calling task's retry resumes from
`last.pt` like a single-process run would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch

from ctdiff.config import Config, TrainDiffusionConfig, TrainVaeConfig
from ctdiff.devices import resolve_device

Kind = Literal["vae", "diffusion"]
PROGRESS_PREFIX = "ctdiff-progress "  # rank 0's progress lines on stdout; everything else is passed on
_TAIL_LINES = 40  # of a failed launch's output, in the error


def training_processes(config: TrainVaeConfig | TrainDiffusionConfig) -> int:
    """`processes`, or (null) one per visible GPU when training on CUDA, else 1."""
    if config.processes is not None:
        return config.processes
    if resolve_device(config.device).type == "cuda":
        return max(torch.cuda.device_count(), 1)
    return 1


def launch_training(
    kind: Kind, config: Config, out_dir: str | Path, processes: int, data: dict[str, str],
    progress: Callable[[dict], None] | None = None,
) -> dict:
    """Train `kind` on `processes` DDP ranks; returns rank 0's summary.

    `data` names the inputs as paths: {"store"} for the VAE; {"store", "latent_root",
    "vae_digest", "vae_checkpoint"} for the diffusion model.
    """
    if processes < 2:
        raise ValueError(f"processes={processes}: a launch needs at least 2 (train in this process instead)")
    launch_dir = Path(out_dir) / ".launch"
    launch_dir.mkdir(parents=True, exist_ok=True)
    job_path, summary_path = launch_dir / "job.json", launch_dir / "summary.json"
    job = {"kind": kind, "config": config.model_dump(mode="json"), "out_dir": str(out_dir),
           "data": data, "summary": str(summary_path)}
    job_path.write_text(json.dumps(job))
    summary_path.unlink(missing_ok=True)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
        "-m", "ctdiff.distributed", str(job_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    tail: list[str] = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(PROGRESS_PREFIX):
                if progress is not None:
                    progress(json.loads(line[len(PROGRESS_PREFIX):]))
                continue
            sys.stderr.write(line)
            tail = (tail + [line.rstrip()])[-_TAIL_LINES:]
    if proc.returncode != 0 or not summary_path.is_file():
        raise RuntimeError(
            f"distributed {kind} training ({processes} processes) exited with code {proc.returncode}:\n"
            + "\n".join(tail)
        )
    return json.loads(summary_path.read_text())


def train(
    kind: Kind, config: Config, out_dir: str | Path, data: dict[str, str], progress: Callable[[dict], None] | None = None
) -> dict:
    """Train `kind` (see `launch_training` for `data`) in this process, or on DDP ranks when
    `training_processes` asks for more than one; returns the training's summary."""
    section = config.train_vae if kind == "vae" else config.train_diffusion
    processes = training_processes(section)
    if processes > 1:
        from ctdiff.store import CaseStore
        from ctdiff.training_loop import training_cases

        store = CaseStore(data["store"])  # an empty val split: a ValueError here, not a crash of every rank
        training_cases(store, store.ids(split="train"), section, f"train_{kind}")
        return launch_training(kind, config, out_dir, processes, data, progress)
    return _run(kind, config, Path(out_dir), data, progress)


def _run(kind: Kind, config: Config, out_dir: Path, data: dict[str, str], progress: Callable[[dict], None] | None) -> dict:
    from ctdiff.store import CaseStore

    store = CaseStore(data["store"])
    if kind == "vae":
        from ctdiff.train_vae import train_vae

        return train_vae(store, out_dir, config, progress)
    from ctdiff.latents import LatentStore
    from ctdiff.train_diffusion import train_diffusion

    latents = LatentStore(data["latent_root"], data["vae_digest"])
    return train_diffusion(store, latents, Path(data["vae_checkpoint"]), out_dir, config, progress)


def main(argv: list[str]) -> None:
    """One rank of `launch_training` (run by torchrun): JOB.json."""
    job = json.loads(Path(argv[0]).read_text())
    is_main = int(os.environ.get("RANK", "0")) == 0

    def report(info: dict) -> None:
        print(PROGRESS_PREFIX + json.dumps(info), flush=True)

    config = Config.model_validate(job["config"])
    summary = _run(job["kind"], config, Path(job["out_dir"]), job["data"], report if is_main else None)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if is_main:
        Path(job["summary"]).write_text(json.dumps(summary, default=str))


if __name__ == "__main__":
    main(sys.argv[1:])
