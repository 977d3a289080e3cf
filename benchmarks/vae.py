"""Benchmark: VAE reconstruction quality and training throughput, per preset.

    .venv/bin/python benchmarks/vae.py > vae.json                 # CPU, a few minutes
    .venv/bin/python benchmarks/vae.py --device cuda --full-steps 200 > vae-gpu.json

Prints one JSON document (progress on stderr):

- quality   tiny presets trained with `train_vae` for `--steps` steps on synthetic cases (the
            train split), then val-split PSNR / SSIM of posterior-mean reconstructions (the
            numbers `train_vae` validates with). Baseline: the same before any training (step 0).
- speed     for every preset, training steps on random patches of `--patch` (depth, size) at
            `--batch`: seconds per step and patches/s after a warm-up, and peak memory (CUDA:
            max allocated; CPU: peak RSS increase of a fresh process).

Each measurement runs in a fresh subprocess so peak memory is its own. Reference: NVIDIA's
published MAISI VAE reaches PSNR 36.6-39.0 dB / SSIM 0.970-0.978 on unseen CT/MR, the bar for a
trained VAE on real data (not reachable by a tiny CPU model on a few synthetic cases).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = ("slice-kl-tiny", "maisi-tiny")
FULL = ("slice-kl", "maisi-ct")


def log(message: str) -> None:
    print(f"[vae-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def build_store(work: Path, n_cases: int, size: int, n_thin: int) -> Path:
    """Synthetic cases ingested at native resolution; the last case is val, the rest train."""
    from ctdiff.cases import discover_cases
    from ctdiff.preprocess import decode_case, resize_case
    from ctdiff.store import CaseStore
    from ctdiff.synth import SynthSpec, synthesize

    store_path = work / "store.zarr"
    if CaseStore(store_path).exists():
        return store_path
    synthesize(work / "cases", SynthSpec(n_cases=n_cases, size=size, n_thin=n_thin, seed=11))
    store = CaseStore(store_path)
    store.create()
    refs = discover_cases(work / "cases")
    for ref in refs:
        decode_case(ref, store)
        resize_case(ref, store, None)
    store.set_splits({ref.id: ("val" if i == len(refs) - 1 else "train") for i, ref in enumerate(refs)})
    return store_path


def measure_quality(preset: str, store_path: str, work: str, steps: int, patch: list[int], batch: int) -> dict:
    import torch

    from ctdiff.config import load_config
    from ctdiff.store import CaseStore
    from ctdiff.train_vae import train_vae

    torch.set_num_threads(2)
    overrides = [
        f"paths.store={store_path}", f"paths.work={work}", f"vae.preset={preset}", f"train_vae.steps={steps}",
        f"train_vae.patch_slices={patch[0]}", f"train_vae.patch_size={patch[1]}", f"train_vae.batch_size={batch}",
        "train_vae.lr=0.001", f"train_vae.val_every={max(steps // 4, 1)}", f"train_vae.checkpoint_every={steps}",
        "train_vae.val_cases=1", "train_vae.device=cpu",
    ]
    start = time.perf_counter()
    summary = train_vae(CaseStore(store_path), Path(work) / "vae", load_config(None, overrides))
    seconds = time.perf_counter() - start
    history = torch.load(Path(work) / "vae" / "last.pt", weights_only=True)["history"]
    vals = [row for row in history if row["val_psnr"] is not None]
    return {
        "preset": preset, "steps": steps, "seconds": round(seconds, 1),
        "val_psnr_db": {"step_0": round(vals[0]["val_psnr"], 2), "final": round(vals[-1]["val_psnr"], 2),
                        "best": round(summary["best_val_psnr"], 2)},
        "val_ssim": {"step_0": round(vals[0]["val_ssim"], 4), "final": round(vals[-1]["val_ssim"], 4)},
        "curve": [(row["step"], round(row["val_psnr"], 2)) for row in vals],
    }


def measure_speed(preset: str, patch: list[int], batch: int, device: str, steps: int) -> dict:
    """Seconds per training step (L1 + KL, AdamW; bf16 autocast and checkpointing on CUDA)."""
    import torch

    from ctdiff.autoencoder import CtAutoencoder, kl_loss

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    dev = torch.device(device)
    model = CtAutoencoder(preset, checkpointing=dev.type == "cuda").to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.rand(batch, 1, patch[0], patch[1], patch[1], device=dev)  # (B, 1, D, H, W)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)

    def step() -> None:
        with autocast:
            recon, mu, sigma = model(x)
            loss = (recon.float() - x).abs().mean() + 1e-6 * kl_loss(mu.float(), sigma.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up: allocator, kernels
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    per_step = (time.perf_counter() - start) / steps
    peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before)
    return {"preset": preset, "device": device, "patch": [patch[0], patch[1], patch[1]], "batch": batch,
            "seconds_per_step": round(per_step, 3), "patches_per_s": round(batch / per_step, 2),
            "peak_memory_bytes": int(peak), "parameters": sum(p.numel() for p in model.parameters())}


def _in_subprocess(kind: str, **kwargs) -> dict:
    code = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(REPO_ROOT)!r})\n"
        "from benchmarks.vae import measure_quality, measure_speed\n"
        f"print(json.dumps(measure_{kind}(**json.loads(sys.argv[1]))))\n"
    )
    result = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True, text=True,
                            cwd=REPO_ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"measure_{kind}({kwargs}) failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps of the tiny presets")
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--size", type=int, default=64, help="in-plane pixels of the synthetic cases")
    parser.add_argument("--device", default="cpu", help="device of the speed measurements")
    parser.add_argument("--patch", type=int, nargs=2, default=[16, 128], metavar=("DEPTH", "SIZE"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--full-steps", type=int, default=2, help="timed steps of the full-size presets")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    work = args.work or Path(tempfile.mkdtemp(prefix="ctdiff-vae-bench-"))
    report: dict = {
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "cpus": __import__("os").cpu_count(),
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "baseline": "the same network before training (step 0); reference bar: published MAISI VAE "
                    "36.6-39.0 dB / SSIM 0.970-0.978 on real CT",
    }
    log(f"synthetic store: {args.cases} cases, {args.size} px")
    store_path = build_store(work, args.cases, args.size, n_thin=40)
    report["quality"] = {}
    for preset in TINY:
        log(f"quality: training {preset} for {args.steps} steps")
        report["quality"][preset] = _in_subprocess(
            "quality", preset=preset, store_path=str(store_path), work=str(work / preset),
            steps=args.steps, patch=[8, 64 if args.size >= 64 else 32], batch=4)
    report["speed"] = []
    for preset in TINY + FULL:
        steps = 20 if preset in TINY else args.full_steps
        log(f"speed: {preset}, {steps} steps at patch {args.patch} batch {args.batch} on {args.device}")
        report["speed"].append(_in_subprocess("speed", preset=preset, patch=args.patch, batch=args.batch,
                                              device=args.device, steps=steps))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
