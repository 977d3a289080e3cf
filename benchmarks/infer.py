"""Benchmark: inference seconds per volume and PSNR versus sampling steps, DDIM and rectified flow.

    .venv/bin/python benchmarks/infer.py > infer.json                        # CPU, tiny presets
    .venv/bin/python benchmarks/infer.py --full --device cuda > infer-gpu.json   # full size, GPU

Prints one JSON document (progress on stderr):

- quality   (tiny presets, CPU) a tiny VAE and, per sampler, a tiny diffusion model trained on
            synthetic cases for a fixed number of steps; then, for each number of sampling
            steps, seconds per val volume (`ThinSliceModel.predict`: encode, windowed sampling,
            decode) and its PSNR against the true thin volume. Baselines: nearest and cubic
            interpolation of the same thick volume, and the VAE ceiling of the formulation
            (base + decoded true residual), scored the same way (ctdiff.metrics).
- full      (--full) seconds per volume at full size: 50 thick -> 250 thin slices of 512 x 512,
            the default config (`slice-kl-4x` VAE, residual formulation, `full` UNet) with
            random weights (speed does not depend on the weights), bf16 autocast on CUDA, with
            peak GPU memory; one sample (infer.samples = K costs about K times the sampling).

Anchors: the seed project reports ~15 s per volume with 20 DDIM steps on an A100; NVIDIA
MAISI's rectified flow is ~33x faster than its DDPM (13 s vs 146 s for 512 x 512 x 128 on an
A100). Target: a full-size volume in under 5 s on an H100 with rectified flow.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.vae import build_store  # noqa: E402  (after the path insert)

WINDOW = (40.0, 400.0)


def log(message: str) -> None:
    print(f"[infer-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _config(work: Path, store_path: Path, sampler: str, args: argparse.Namespace):
    from ctdiff.config import load_config

    return load_config(None, [
        f"paths.store={store_path}", f"paths.work={work}", "vae.preset=slice-kl-4x-tiny",
        f"train_vae.steps={args.vae_steps}", "train_vae.patch_slices=4", "train_vae.patch_size=64",
        "train_vae.lr=0.001", f"train_vae.val_every={args.vae_steps}", f"train_vae.checkpoint_every={args.vae_steps}",
        "train_vae.val_cases=1", "train_vae.device=cpu",
        "diffusion.preset=tiny", f"diffusion.sampler={sampler}", "diffusion.window_slices=16",
        "diffusion.overlap_slices=4", f"train_diffusion.steps={args.diffusion_steps}", "train_diffusion.batch_size=4",
        "train_diffusion.lr=0.001", "train_diffusion.ema_decay=0.99", "train_diffusion.val_cases=1",
        f"train_diffusion.val_every={args.diffusion_steps}", f"train_diffusion.checkpoint_every={args.diffusion_steps}",
        "train_diffusion.device=cpu", "encode.device=cpu",
    ])


def train_models(work: Path, store_path: Path, args: argparse.Namespace) -> dict[str, Path]:
    """A tiny VAE, its latents, and one tiny diffusion model per sampler: {sampler: checkpoint}."""
    from ctdiff.checkpoint import checkpoint_digest, load_vae
    from ctdiff.latents import LatentStore, compute_scale_factor, encode_case
    from ctdiff.residual import vae_base
    from ctdiff.store import CaseStore
    from ctdiff.train_diffusion import train_diffusion
    from ctdiff.train_vae import train_vae

    store = CaseStore(store_path)
    config = _config(work, store_path, "rflow", args)
    log(f"training {config.vae.preset} for {args.vae_steps} steps")
    vae_path = Path(train_vae(store, work / "vae", config)["best"])
    vae, payload = load_vae(vae_path, "cpu")
    base = vae_base(payload)
    latents = LatentStore(work / "latents", checkpoint_digest(vae_path))
    latents.create(vae.preset_name, vae.factors, WINDOW, base)
    for case_id in store.ids():
        encode_case(store, case_id, vae, latents, WINDOW, 64, "cpu", case_id, base)
    latents.set_scale_factor(compute_scale_factor(latents, store.ids(split="train")))
    checkpoints = {}
    for sampler in ("ddim", "rflow"):
        log(f"training tiny diffusion ({sampler}) for {args.diffusion_steps} steps")
        result = train_diffusion(store, latents, vae_path, work / sampler, _config(work, store_path, sampler, args))
        checkpoints[sampler] = Path(result["last"])
    return checkpoints


def measure_quality(checkpoints: dict[str, Path], store_path: Path, step_counts: list[int]) -> dict:
    from ctdiff.interpolate import interpolate_z
    from ctdiff.metrics import score
    from ctdiff.store import CaseStore
    from ctdiff.thin_slice import ThinSliceModel

    store = CaseStore(store_path)
    case_id = store.ids(split="val")[0]
    thick, thin = store.read(case_id, "thick"), store.read(case_id, "thin")
    x, truth = thick.window(*WINDOW), thin.window(*WINDOW)
    out: dict = {"case": case_id, "thick_slices": int(thick.shape[0]), "thin_slices": int(thin.shape[0]),
                 "size": list(thin.shape[1:]), "baselines": {}}
    for method in ("nearest", "cubic"):
        out["baselines"][method] = round(score(interpolate_z(x, thick.z_mm, thin.z_mm, method), truth)["psnr"], 2)
    for sampler, path in checkpoints.items():
        model = ThinSliceModel.load(path, "cpu")
        ceiling = model.ceiling(truth, x, thick.z_mm, thin.z_mm)
        out["baselines"].setdefault("vae_ceiling", round(score(ceiling, truth)["psnr"], 2))
        model.predict(x, thick.z_mm, thin.z_mm, sample_steps=1)  # warm-up
        rows = []
        for steps in step_counts:
            start = time.perf_counter()
            prediction = model.predict(x, thick.z_mm, thin.z_mm, seed=0, sample_steps=steps)
            seconds = time.perf_counter() - start
            rows.append({"steps": steps, "seconds": round(seconds, 3),
                         "psnr_db": round(score(prediction, truth)["psnr"], 2)})
            log(f"{sampler} {steps:>3} steps: {rows[-1]}")
        out[sampler] = rows
    return out


def measure_full(device: str, step_counts: list[int], repeats: int, size: int = 512, n_thick: int = 50) -> dict:
    """Seconds per full-size volume (random weights): 50 thick x 512 x 512 -> 250 thin slices."""
    import torch

    from ctdiff.autoencoder import CtAutoencoder
    from ctdiff.config import load_config
    from ctdiff.diffusion import build_unet
    from ctdiff.residual import condition_channels
    from ctdiff.thin_slice import ThinSliceModel

    dev = torch.device(device)
    results = {}
    for sampler in ("rflow", "ddim"):
        config = load_config(None, [f"diffusion.sampler={sampler}", f"train_diffusion.device={device}"])
        torch.manual_seed(0)
        vae = CtAutoencoder(config.vae.preset).to(dev).eval()
        unet = build_unet(
            config.diffusion.preset, vae.preset.latent_channels, condition_channels(vae.factors)
        ).to(dev).eval()
        model = ThinSliceModel(unet, vae, config, 1.0, 5.0, 1.0, dev)
        rng = np.random.default_rng(0)
        thick = rng.random((n_thick, size, size), dtype=np.float32)
        thick_z = np.arange(n_thick) * 5.0
        thin_z = np.arange(5 * n_thick) * 1.0 - 2.0  # 5 mm -> 1 mm over the same extent
        model.predict(thick, thick_z, thin_z, sample_steps=1)  # warm-up: kernels, allocator
        rows = []
        for steps in step_counts:
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                model.predict(thick, thick_z, thin_z, sample_steps=steps)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            row = {"steps": steps, "seconds": round(min(times), 3)}
            if dev.type == "cuda":
                row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            rows.append(row)
            log(f"full {sampler} {steps:>3} steps: {row}")
        results[sampler] = rows
    return {"shape": f"{n_thick} thick -> {5 * n_thick} thin slices, {size} x {size}", "vae": "slice-kl-4x (default config)", "unet": "full",
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else device, **results}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--vae-steps", type=int, default=300)
    parser.add_argument("--diffusion-steps", type=int, default=400)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 5, 10, 20, 50], help="sampling steps")
    parser.add_argument("--full", action="store_true", help="time full-size volumes instead (GPU)")
    parser.add_argument("--device", default="cpu", help="device of --full")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per point of --full (best kept)")
    parser.add_argument("--full-size", type=int, default=512, help="in-plane pixels of --full")
    parser.add_argument("--full-thick", type=int, default=50, help="thick slices of --full")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    report: dict = {
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "cpus": __import__("os").cpu_count(),
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "baseline": "nearest and cubic interpolation of the same thick volume; the VAE ceiling",
    }
    if args.full:
        report["full"] = measure_full(args.device, args.steps, args.repeats, args.full_size, args.full_thick)
    else:
        torch.set_num_threads(2)
        work = args.work or Path(tempfile.mkdtemp(prefix="ctdiff-infer-bench-"))
        log(f"synthetic store: {args.cases} cases, {args.size} px, in {work}")
        store_path = build_store(work, args.cases, args.size, n_thin=40)
        checkpoints = train_models(work, store_path, args)
        report["quality"] = measure_quality(checkpoints, store_path, args.steps)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
