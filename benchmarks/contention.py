"""Benchmark: the demo's training stages alone and beside a fixed CPU load.

    .venv/bin/python benchmarks/contention.py > contention.json     # a few minutes, CPU

A fair share of a busy machine is about (cores used by both) / (cores used by us) slower: beside
one busy process per core, about 2x. Torch's default of one intra-op thread per core makes each
training step wait at its threads' barriers for whichever thread the load has just descheduled,
which costs far more than the share (13x was seen for the whole demo).

For each thread setting, the seconds per training step of the demo's VAE (slice-kl-4x-tiny,
4 x 64 x 64 patches, batch 4) and diffusion UNet (the demo's preset on 16-slice windows of its 16 x 16 latents)
are measured in a fresh process: alone, then beside LOAD busy processes (default: one per usable
core, each a pure-Python loop, the same fixed load every run). Settings:

- `torch-default`: what torch picks (one thread per core): the baseline, as the demo ran before.
- `ctdiff`: what ctdiff's training loop picks (ctdiff.threads.ThreadGovernor): the CPUs it may
  use (affinity, cgroup quota), shared among its processes, less those other work keeps busy.

Prints one JSON document: per setting and stage, the threads and seconds per step alone and
loaded, the slowdown (loaded / alone) and the slowdown against the baseline (loaded / torch-default
alone, what a user compares with); the target is <= 2.5x.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

STEP_CODE = """
import json, sys, time
sys.path.insert(0, {root!r})
import torch
setting, stage, steps = {setting!r}, {stage!r}, {steps}
if setting == "ctdiff":
    from ctdiff.threads import configure_threads
    configure_threads(adapt=True)  # as the Trainer's ThreadGovernor does at the start
threads = torch.get_num_threads()
torch.manual_seed(0)
if stage == "vae":
    from ctdiff.autoencoder import CtAutoencoder, kl_loss
    model = CtAutoencoder("slice-kl-4x-tiny").train()
    x = torch.rand(4, 1, 4, 64, 64)
    def loss_fn():
        recon, mu, sigma = model(x)
        return (recon - x).abs().mean() + 1e-6 * kl_loss(mu, sigma)
else:
    from ctdiff.autoencoder import CtAutoencoder
    from ctdiff.config import load_config
    from ctdiff.diffusion import build_unet
    latent = CtAutoencoder("slice-kl-4x-tiny").preset.latent_channels
    model = build_unet(load_config("demo").diffusion.preset, latent).train()
    x = torch.rand(4, 2 * latent, 16, 16, 16)  # a 16-slice window of 16 x 16 latents (64 px)
    t = torch.randint(0, 1000, (4,))
    def loss_fn():
        return model(x, t).pow(2).mean()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
def step():
    loss = loss_fn()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
for _ in range(3):
    step()  # warm-up
start = time.perf_counter()
for _ in range(steps):
    step()
print(json.dumps({{"seconds_per_step": (time.perf_counter() - start) / steps, "threads": threads}}))
"""

HOG_CODE = "while True:\n    pass\n"


def measure(setting: str, stage: str, steps: int) -> dict:
    code = STEP_CODE.format(root=str(REPO_ROOT), setting=setting, stage=stage, steps=steps)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CTDIFF_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", type=int, default=len(os.sched_getaffinity(0)),
                        help="busy processes beside the measurement (default: one per usable core)")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    results = []
    for setting in ("torch-default", "ctdiff"):
        for stage in ("vae", "diffusion"):
            alone = measure(setting, stage, args.steps)
            hogs = [subprocess.Popen([sys.executable, "-c", HOG_CODE]) for _ in range(args.load)]
            try:
                time.sleep(1)  # the load is running before the first step
                loaded = measure(setting, stage, args.steps)
            finally:
                for hog in hogs:
                    hog.kill()
                    hog.wait()
            baseline = next((r["alone_s_per_step"] for r in results
                             if r["setting"] == "torch-default" and r["stage"] == stage), alone["seconds_per_step"])
            row = {"setting": setting, "stage": stage,
                   "threads_alone": alone["threads"], "threads_loaded": loaded["threads"],
                   "alone_s_per_step": round(alone["seconds_per_step"], 4),
                   "loaded_s_per_step": round(loaded["seconds_per_step"], 4),
                   "slowdown": round(loaded["seconds_per_step"] / alone["seconds_per_step"], 2),
                   "slowdown_vs_baseline": round(loaded["seconds_per_step"] / baseline, 2)}
            print(json.dumps(row), file=sys.stderr, flush=True)
            results.append(row)
    print(json.dumps({
        "benchmark": "contention", "date": time.strftime("%Y-%m-%d"), "machine": platform.machine(),
        "usable_cpus": len(os.sched_getaffinity(0)), "load_processes": args.load, "steps": args.steps,
        "baseline": "torch-default threads, alone, in the same run", "target_slowdown": 2.5,
        "results": results,
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
