"""Setting sweeps on val cases only: how the demo's settings were chosen (CPU, minutes each).

    # VAE: steps, lr (and patch depth) of the residual VAE, scored by its val ceiling
    .venv/bin/python benchmarks/sweep.py vae --store STORE.zarr --out /tmp/sweep 500,1e-3,4 500,2e-3,4
    # sampling: rflow steps of a trained model, K-sample mean on the val split; or K itself
    .venv/bin/python benchmarks/sweep.py steps --store STORE.zarr --checkpoint best.pt --samples 4 1 3 10
    .venv/bin/python benchmarks/sweep.py samples --store STORE.zarr --checkpoint best.pt 4 8 16
    # diffusion training: settings (`;`-separated KEY=VALUE) on a store's latent cache
    .venv/bin/python benchmarks/sweep.py diffusion --store STORE.zarr --vae vae/best.pt --latents LATENTS \
        --out /tmp/sweep "train_diffusion.steps=600;train_diffusion.lr=4e-3"

STORE is a case store with a val split (e.g. `ctdiff-demo/store.zarr` after `ctdiff demo`, or
`--work W` of benchmarks/quality.py: `W/train/store.zarr`). Settings start from
config/demo.yaml. Prints one line per setting: seconds, and the val figures (in-between
PSNR / SSIM against cubic on the same cases). Never point it at test cases.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
DEMO = REPO_ROOT / "config" / "demo.yaml"


def _val_scores(model, store, samples: int) -> dict:
    from ctdiff.evaluate import baseline_predictors, evaluate_cases, model_predictors

    window = model.window
    predictors = {"cubic": baseline_predictors(window)["cubic"], **model_predictors(model, "model", window, 0, samples)}
    means = evaluate_cases(store, store.ids(split="val"), window, predictors).means("in_between")
    return {m: (round(s["psnr"], 2), round(s["ssim"], 4), round(s["hist_w1_hu"], 2)) for m, s in means.items()}


def sweep_vae(store, out: Path, settings: list[str]) -> None:
    """Each setting "steps,lr,patch_slices": a residual VAE trained on the store's train split;
    its validation history (ceiling PSNR / SSIM on the val split, all slices)."""
    from ctdiff.checkpoint import load_checkpoint
    from ctdiff.config import load_config
    from ctdiff.train_vae import train_vae

    for setting in settings:
        steps, lr, patch_slices = setting.split(",")
        config = load_config(DEMO, [f"train_vae.steps={steps}", f"train_vae.lr={lr}", "train_vae.val_every=250",
                                    "train_vae.checkpoint_every=250", f"train_vae.patch_slices={patch_slices}"])
        started = time.perf_counter()
        result = train_vae(store, out / f"vae_{setting}", config)
        history = load_checkpoint(result["last"])["history"]
        rows = [(r["step"], round(r["val_psnr"], 2), round(r.get("val_ssim") or 0.0, 4)) for r in history if r.get("val_psnr")]
        print(setting, round(time.perf_counter() - started), rows, flush=True)


def sweep_steps(store, checkpoint: Path, samples: int, steps: list[int]) -> None:
    from ctdiff.thin_slice import ThinSliceModel

    model = ThinSliceModel.load(checkpoint, "cpu")
    for n in steps:
        model.config.diffusion.sample_steps = n
        started = time.perf_counter()
        scores = _val_scores(model, store, samples)
        print(n, round(time.perf_counter() - started, 1), scores, flush=True)


def sweep_samples(store, checkpoint: Path, samples: list[int]) -> None:
    from ctdiff.thin_slice import ThinSliceModel

    model = ThinSliceModel.load(checkpoint, "cpu")
    for k in samples:
        started = time.perf_counter()
        scores = _val_scores(model, store, k)
        print(k, round(time.perf_counter() - started, 1), scores, flush=True)


def sweep_diffusion(store, vae: Path, latents_root: Path, out: Path, samples: int, settings: list[str]) -> None:
    from ctdiff.checkpoint import checkpoint_digest
    from ctdiff.config import load_config
    from ctdiff.latents import LatentStore
    from ctdiff.thin_slice import ThinSliceModel
    from ctdiff.train_diffusion import train_diffusion

    latents = LatentStore(latents_root, checkpoint_digest(vae))
    for setting in settings:
        config = load_config(DEMO, setting.split(";"))
        started = time.perf_counter()
        result = train_diffusion(store, latents, vae, out / setting.replace(";", "_").replace("=", "-"), config)
        seconds = round(time.perf_counter() - started)
        print(setting, seconds, _val_scores(ThinSliceModel.load(result["best"], "cpu"), store, samples), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    vae = sub.add_parser("vae")
    vae.add_argument("settings", nargs="+", metavar="STEPS,LR,PATCH_SLICES")
    steps = sub.add_parser("steps")
    steps.add_argument("--checkpoint", type=Path, required=True)
    steps.add_argument("steps", nargs="+", type=int)
    samples = sub.add_parser("samples")
    samples.add_argument("--checkpoint", type=Path, required=True)
    samples.add_argument("samples", nargs="+", type=int, metavar="K")
    diffusion = sub.add_parser("diffusion")
    diffusion.add_argument("--vae", type=Path, required=True)
    diffusion.add_argument("--latents", type=Path, required=True, help="the latent root (holding <vae digest>/)")
    diffusion.add_argument("settings", nargs="+", metavar="KEY=VALUE;...")
    for p in (vae, steps, samples, diffusion):
        p.add_argument("--store", type=Path, required=True)
    for p in (vae, diffusion):
        p.add_argument("--out", type=Path, required=True)
    for p in (steps, diffusion):
        p.add_argument("--samples", type=int, default=4)
    args = parser.parse_args(argv)

    import torch

    from ctdiff.store import CaseStore

    torch.set_num_threads(2)
    store = CaseStore(args.store)
    if args.what == "vae":
        sweep_vae(store, args.out, args.settings)
    elif args.what == "steps":
        sweep_steps(store, args.checkpoint, args.samples, args.steps)
    elif args.what == "samples":
        sweep_samples(store, args.checkpoint, args.samples)
    else:
        sweep_diffusion(store, args.vae, args.latents, args.out, args.samples, args.settings)


if __name__ == "__main__":
    main()
