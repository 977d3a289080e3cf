"""Benchmark: how should the residual over cubic live in latent space? (CPU, a few minutes)

    .venv/bin/python benchmarks/formulation.py > formulation.json

The VAE ceiling of each formulation on held-out synthetic cases (64 px, seed never trained on),
in-between slices, against cubic interpolation, for autoencoders of 8x, 4x and 2x in-plane
compression (the tiny slice presets), every VAE trained the same way (same steps, patches,
optimiser, seed):

- `image`:        D(E(thin)), a VAE trained on windowed images (L1): the original formulation.
- `latent_diff`:  base + D(E(thin)) - D(E(base)), the same image VAE: the residual as a
                  difference of latents, whose decoding errors partly cancel.
- `residual_vae`: base + D(E(g (thin - base))) / g, a VAE trained on gained residuals
                  (squared error; ctdiff.residual): what ctdiff does.

A ceiling is what a perfect diffusion model could reach in that latent space; the model has to
learn the rest. Prints one JSON document; progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

WINDOW = (40.0, 400.0)
PRESETS = ("slice-kl-tiny", "slice-kl-4x-tiny", "slice-kl-2x-tiny")


def log(message: str) -> None:
    print(f"[formulation {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cases(seed: int, n_cases: int, size: int, n_thin: int) -> list[dict]:
    """Windowed thin, thick, base (cubic) and in-between mask per synthetic case, z ascending."""
    from ctdiff.metrics import in_between_mask
    from ctdiff.residual import base_volume
    from ctdiff.synth import SynthSpec, phantom_pair
    from ctdiff.windowing import apply_window

    out = []
    for index in range(n_cases):
        thin_hu, thick_hu, geo = phantom_pair(SynthSpec(size=size, n_thin=n_thin, seed=seed), index)
        thin = apply_window(thin_hu[geo.covered][::-1], *WINDOW)
        thick = apply_window(thick_hu[::-1], *WINDOW)
        thin_z, thick_z = geo.thin_z_mm[geo.covered][::-1].copy(), geo.thick_z_mm[::-1].copy()
        base = base_volume(thick, thick_z, thin_z, "cubic")
        out.append({"thin": thin, "thick": thick, "base": base, "between": in_between_mask(thick_z, thin_z)})
    return out


def fit(preset: str, train: list[dict], target: str, steps: int, seed: int = 0):
    """A tiny VAE on random 4-slice stacks: windowed images (L1, thin and base slices) or gained
    residuals (squared error), as train_vae does for each formulation."""
    import torch

    from ctdiff.autoencoder import CtAutoencoder, kl_loss
    from ctdiff.residual import residual_target

    torch.manual_seed(seed)
    model = CtAutoencoder(preset)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        stacks = []
        for _ in range(4):
            case = train[rng.integers(len(train))]
            z0 = rng.integers(case["thin"].shape[0] - 4)
            if target == "residual":
                stacks.append(residual_target(case["thin"][z0 : z0 + 4], case["base"][z0 : z0 + 4]))
            else:
                stacks.append((case["thin"] if rng.random() < 0.5 else case["base"])[z0 : z0 + 4])
        x = torch.from_numpy(np.stack(stacks)[:, None])  # (4, 1, 4, H, W)
        recon, mu, sigma = model(x)
        error = (recon - x).pow(2).mean() if target == "residual" else (recon - x).abs().mean()
        loss = error + 1e-6 * kl_loss(mu, sigma)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def ceilings(preset: str, train: list[dict], test: list[dict], steps: int) -> dict:
    from ctdiff.latents import decode_latents, encode_volume
    from ctdiff.metrics import score
    from ctdiff.residual import compose, residual_target

    def through(model, volume):
        return decode_latents(model, encode_volume(model, volume, 64), volume.shape, 64)

    started = time.perf_counter()
    image_vae = fit(preset, train, "image", steps)
    residual_vae = fit(preset, train, "residual", steps)
    seconds = time.perf_counter() - started
    scores: dict[str, list] = {"image": [], "latent_diff": [], "residual_vae": []}
    for case in test:
        thin, base, between = case["thin"], case["base"], case["between"]
        outputs = {
            "image": np.clip(through(image_vae, thin), 0, 1),
            "latent_diff": np.clip(base + through(image_vae, thin) - through(image_vae, base), 0, 1),
            "residual_vae": compose(base, through(residual_vae, residual_target(thin, base))),
        }
        for name, output in outputs.items():
            scores[name].append(score(output, thin, between))
    log(f"{preset}: both VAEs trained in {seconds:.0f} s")
    return {name: _mean(rows) for name, rows in scores.items()} | {"train_seconds": round(seconds, 1)}


def _mean(rows: list[dict]) -> dict:
    return {"psnr": round(float(np.mean([r["psnr"] for r in rows])), 2),
            "ssim": round(float(np.mean([r["ssim"] for r in rows])), 4)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps of every VAE")
    parser.add_argument("--train-cases", type=int, default=6)
    parser.add_argument("--test-cases", type=int, default=3)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS))
    args = parser.parse_args(argv)

    import torch

    from ctdiff.metrics import score

    torch.set_num_threads(2)
    train = cases(0, args.train_cases, 64, 60)
    test = cases(7919, args.test_cases, 64, 60)  # a seed no VAE trains on
    out = {
        "benchmark": "formulation", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "steps": args.steps,
        "train_cases": args.train_cases, "test_cases": args.test_cases, "region": "in-between slices",
        "cubic": _mean([score(c["base"], c["thin"], c["between"]) for c in test]),
        "ceilings": {preset: ceilings(preset, train, test, args.steps) for preset in args.presets},
    }
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
