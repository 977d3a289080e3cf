"""VAE training on several processes (DDP), started with torchrun from one calling process.

A flow run is one process; DDP wants one process per GPU. `launch_train_vae` bridges the two:
it writes the resolved config beside the checkpoints, runs

    python -m torch.distributed.run --standalone --nproc_per_node=N -m ctdiff.distributed ...

whose ranks each run `ctdiff.train_vae.train_vae` (DDP under torchrun's WORLD_SIZE; NCCL on
GPUs, gloo on the CPU), relays rank 0's progress to the caller and returns rank 0's summary.
A rank that dies fails the launch with a RuntimeError, so the calling task's retry resumes from
`last.pt` like a single-process run would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from ctdiff.config import Config, TrainVaeConfig
from ctdiff.devices import resolve_device

PROGRESS_PREFIX = "ctdiff-progress "  # rank 0's progress lines on stdout; everything else is passed on
_TAIL_LINES = 40  # of a failed launch's output, in the error


def training_processes(config: TrainVaeConfig) -> int:
    """`train_vae.processes`, or (null) one per visible GPU when training on CUDA, else 1."""
    if config.processes is not None:
        return config.processes
    if resolve_device(config.device).type == "cuda":
        return max(torch.cuda.device_count(), 1)
    return 1


def launch_train_vae(
    store_path: str | Path, out_dir: str | Path, config: Config, processes: int,
    progress: Callable[[dict], None] | None = None,
) -> dict:
    """`train_vae` on `processes` DDP ranks; returns rank 0's summary (see `train_vae`)."""
    if processes < 2:
        raise ValueError(f"processes={processes}: a launch needs at least 2 (call train_vae directly)")
    launch_dir = Path(out_dir) / ".launch"
    launch_dir.mkdir(parents=True, exist_ok=True)
    config_path, summary_path = launch_dir / "config.json", launch_dir / "summary.json"
    config_path.write_text(config.model_dump_json())
    summary_path.unlink(missing_ok=True)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
        "-m", "ctdiff.distributed", str(config_path), str(store_path), str(out_dir), str(summary_path),
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
            f"distributed VAE training ({processes} processes) exited with code {proc.returncode}:\n"
            + "\n".join(tail)
        )
    return json.loads(summary_path.read_text())


def main(argv: list[str]) -> None:
    """One rank of `launch_train_vae` (run by torchrun): CONFIG.json STORE OUT_DIR SUMMARY.json."""
    from ctdiff.store import CaseStore
    from ctdiff.train_vae import train_vae

    config_path, store_path, out_dir, summary_path = argv
    config = Config.model_validate_json(Path(config_path).read_text())
    is_main = int(os.environ.get("RANK", "0")) == 0

    def report(info: dict) -> None:
        print(PROGRESS_PREFIX + json.dumps(info), flush=True)

    summary = train_vae(CaseStore(store_path), Path(out_dir), config, report if is_main else None)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if is_main:
        Path(summary_path).write_text(json.dumps(summary, default=str))


if __name__ == "__main__":
    main(sys.argv[1:])
