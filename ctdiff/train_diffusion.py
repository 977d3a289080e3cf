"""Training the latent diffusion model on the latent cache: windows, EMA, best/last, resumable.

Each step draws random depth windows of thin latents with their thick-latent condition
(ctdiff.latent_windows) and minimises the sampler's loss (ctdiff.samplers) with AdamW, bf16
autocast on CUDA and gradient clipping. An exponential moving average of the weights (EMA) is
what validation, `best.pt` and inference use. Validation samples whole val cases through the
same `ThinSliceModel` that evaluation and `ctdiff infer` use: thick volume -> VAE -> windowed
sampling -> VAE decode, scored by PSNR/SSIM against the true thin volume.

Resume is exact: `last.pt` holds the weights, EMA, optimiser state, step, history and every
random generator the loop draws from (torch's, CUDA's, the noise generator and the window
sampler's), so a run killed after a checkpoint and started again reaches bit-identical weights
(CPU, single process). Validation draws from its own seeded generator.

Under torchrun (WORLD_SIZE > 1, see ctdiff.distributed) the UNet is wrapped in DDP, each rank
draws its own windows and noise, and only rank 0 validates and writes; there, resume re-seeds
each rank from (seed, rank, step), since only one set of generator states is saved.

Checkpoint keys (plain values and tensors, `weights_only=True`): kind ("diffusion"), preset,
sampler, prediction, model (the EMA weights: what inference loads and `checkpoint_digest`
hashes), train_model (the raw weights), ema_n_averaged, optimizer, step, best_val_psnr, history,
rng {torch, noise, numpy, cuda}, config (resolved), vae {path, relative_path, digest}, latent
{channels, condition_channels, factors, scale_factor, vae_preset}, formulation {base,
slab_consistency} (ctdiff.residual; checkpoints without it are of base none), thick_mm and
thin_mm (median of the train cases).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ctdiff.checkpoint import checkpoint_digest, load_checkpoint, load_vae, save_checkpoint
from ctdiff.config import Config
from ctdiff.devices import resolve_device
from ctdiff.diffusion import build_unet, get_preset
from ctdiff.latent_windows import LatentWindowSampler
from ctdiff.latents import LatentStore
from ctdiff.metrics import score
from ctdiff.plots import plot_training_curves
from ctdiff.residual import vae_base
from ctdiff.samplers import make_sampler
from ctdiff.store import CaseStore
from ctdiff.thin_slice import ThinSliceModel, vae_record
from ctdiff.training_loop import Distributed, Progress, StepReporter, autocast_context, setup_distributed



def train_diffusion(
    case_store: CaseStore, latent_store: LatentStore, vae_checkpoint: Path, out_dir: Path, config: Config,
    progress: Progress | None = None,
) -> dict:
    """Train or resume; see the module docstring.

    Writes `last.pt`, `best.pt` (best val PSNR) and `loss.png` under `out_dir`; returns {step,
    best_val_psnr, last, best, loss_plot (paths as str), resumed_from (step of the last.pt
    found, or None)}.
    """
    dc, tc = config.diffusion, config.train_diffusion
    out_dir, vae_checkpoint = Path(out_dir), Path(vae_checkpoint)
    paths = {"last": out_dir / "last.pt", "best": out_dir / "best.pt", "loss_plot": out_dir / "loss.png"}
    resume = load_checkpoint(paths["last"]) if paths["last"].is_file() else None
    if resume is not None:
        _check_resumable(resume, paths["last"], config)
        if resume["step"] >= tc.steps:  # finished already: nothing to do
            return _summary(paths, resume["step"], resume["best_val_psnr"], resume["step"])

    train_ids, scale_factor = _training_cases(case_store, latent_store)
    vae_digest = checkpoint_digest(vae_checkpoint)
    if vae_digest != latent_store.vae_digest:
        raise ValueError(
            f"latent store {latent_store.path} holds the latents of VAE {latent_store.vae_digest}, not of "
            f"{vae_checkpoint} ({vae_digest}); run `ctdiff encode-latents` with that VAE"
        )
    if resume is not None and resume["vae"]["digest"] != vae_digest:
        raise ValueError(
            f"{paths['last']} was trained on the latents of another VAE ({resume['vae']['digest']}); "
            "use another paths.work or delete that checkpoint"
        )
    dist, device = setup_distributed(tc.device)
    if not dist.enabled:
        device = resolve_device(tc.device)  # checks that a requested GPU is there
    vae, vae_payload = load_vae(vae_checkpoint, device)
    if not vae_base(vae_payload) == latent_store.base == dc.base:
        raise ValueError(
            f"diffusion.base is {dc.base!r}, but the VAE {vae_checkpoint} was trained for base "
            f"{vae_base(vae_payload)!r} and its latents encoded for {latent_store.base!r}; train the VAE "
            "and encode the latents with the same diffusion.base"
        )
    channels = int(latent_store.entry(train_ids[0])["thin_latent_shape"][0])
    multiple = get_preset(dc.preset).size_multiple
    _check_sizes(config, multiple)

    windows = LatentWindowSampler(
        latent_store, train_ids, dc.window_slices, tc.latent_patch, multiple, scale_factor,
        rng=np.random.default_rng([tc.seed, dist.rank]) if dist.enabled else np.random.default_rng(tc.seed),
    )
    torch.manual_seed(tc.seed)  # the same initial weights on every run and rank
    unet = build_unet(dc.preset, channels, windows.condition_channels).to(device)
    ema = AveragedModel(unet, multi_avg_fn=get_ema_multi_avg_fn(tc.ema_decay), use_buffers=True)
    opt = torch.optim.AdamW(unet.parameters(), lr=tc.lr, foreach=True)  # one kernel per step, not per tensor
    sampler = make_sampler(dc)
    # Timesteps and noise of the loss; one stream per rank under DDP.
    noise_generator = torch.Generator().manual_seed(tc.seed * 1000 + dist.rank if dist.enabled else tc.seed)
    spacing = _spacings_mm(latent_store, train_ids)
    step, best_psnr, history, resumed_from, latest_psnr = 0, -math.inf, [], None, None
    if resume is not None:
        unet.load_state_dict(resume["train_model"])
        ema.module.load_state_dict(resume["model"])
        ema.n_averaged.fill_(resume["ema_n_averaged"])
        opt.load_state_dict(resume["optimizer"])
        step, best_psnr, history = resume["step"], resume["best_val_psnr"], resume["history"]
        resumed_from = step
        latest_psnr = next((r["val_psnr"] for r in reversed(history) if r["val_psnr"] is not None), None)
        _restore_rng(resume["rng"], windows, noise_generator, dist, tc.seed, step)
    del resume

    val_ids = (case_store.ids(split="val") or train_ids)[: tc.val_cases]
    autocast = autocast_context(device, tc.precision)
    thin_model = ThinSliceModel(ema.module, vae, config, scale_factor, spacing["thick_mm"], spacing["thin_mm"], device)
    reporter = StepReporter(progress if dist.is_main else None, step, tc.steps)
    train_unet = dist.wrap(unet, device)  # DDP averages gradients across ranks; unet stays the module

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with autocast:
            return train_unet(x, t)  # (B, C, D, H, W)

    def save(path: Path) -> None:
        save_checkpoint(path, {
            "kind": "diffusion", "preset": dc.preset, "sampler": dc.sampler, "prediction": sampler.prediction,
            "model": ema.module.state_dict(), "ema_n_averaged": int(ema.n_averaged),
            "train_model": unet.state_dict(), "optimizer": opt.state_dict(),
            "step": step, "best_val_psnr": best_psnr, "history": history,
            "rng": {
                "torch": torch.get_rng_state(), "noise": noise_generator.get_state(),
                "numpy": windows.rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
            "config": config.model_dump(mode="json"),
            "vae": vae_record(vae_checkpoint, out_dir, vae_digest),
            "latent": {"channels": channels, "condition_channels": windows.condition_channels,
                       "factors": list(vae.factors), "scale_factor": scale_factor, "vae_preset": vae.preset_name},
            "formulation": {"base": dc.base, "slab_consistency": dc.slab_consistency},
            **spacing,
        })

    def validate_and_save(row: dict, checkpoint: bool) -> None:
        nonlocal best_psnr, latest_psnr
        row.update(validate(thin_model, case_store, val_ids, tc.seed))
        latest_psnr = row["val_psnr"]
        if row["val_psnr"] > best_psnr:
            best_psnr = row["val_psnr"]
            save(paths["best"])
        if checkpoint:
            save(paths["last"])
            plot_training_curves(history, paths["loss_plot"], title=f"diffusion {dc.preset} ({dc.sampler})")

    while step < tc.steps:
        x0, cond, mask = (torch.from_numpy(a).to(device) for a in windows.sample(tc.batch_size))  # (B, C, W, h, w)
        unet.train()
        loss = sampler.training_loss(model_fn, x0, cond, mask, noise_generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), tc.grad_clip)
        opt.step()
        ema.update_parameters(unet)
        step += 1
        row = {"step": step, "loss": loss.item(), "val_psnr": None, "val_ssim": None}
        history.append(row)
        do_val = step % tc.val_every == 0 or step == tc.steps
        do_ckpt = step % tc.checkpoint_every == 0 or step == tc.steps
        if do_val and dist.is_main:  # rank 0 validates and writes; the others wait for it
            validate_and_save(row, checkpoint=do_ckpt)
        elif do_ckpt and dist.is_main:
            save(paths["last"])
            plot_training_curves(history, paths["loss_plot"], title=f"diffusion {dc.preset} ({dc.sampler})")
        if do_val or do_ckpt:
            dist.barrier()
        reporter(step, row["loss"], latest_psnr, force=do_val or do_ckpt)

    if tc.steps == 0 and dist.is_main:  # nothing to train: record the initial weights with one validation
        row = {"step": 0, "loss": None, "val_psnr": None, "val_ssim": None}
        history.append(row)
        validate_and_save(row, checkpoint=True)
        reporter(0, None, latest_psnr, force=True)
    return _summary(paths, step, best_psnr, resumed_from)


def _summary(paths: dict, step: int, best_psnr: float, resumed_from: int | None) -> dict:
    return {
        "step": step,
        "best_val_psnr": best_psnr if math.isfinite(best_psnr) else None,
        **{name: str(path) for name, path in paths.items()},
        "resumed_from": resumed_from,
    }


# -- validation ----------------------------------------------------------------------------------


def validate(model: ThinSliceModel, case_store: CaseStore, case_ids: list[str], seed: int) -> dict:
    """Mean val PSNR/SSIM of thin volumes sampled from the thick ones, at the true thin positions,
    scored as `ctdiff evaluate` scores them (ctdiff.metrics)."""
    psnrs, ssims = [], []
    for case_id in case_ids:
        thick, thin = case_store.read(case_id, "thick"), case_store.read(case_id, "thin")
        prediction = model.predict(thick.window(*model.window), thick.z_mm, thin.z_mm, seed=seed)
        metrics = score(prediction, thin.window(*model.window), device=model.device)
        psnrs.append(metrics["psnr"])
        ssims.append(metrics["ssim"])
    return {"val_psnr": float(np.mean(psnrs)), "val_ssim": float(np.mean(ssims))}


# -- set-up ----------------------------------------------------------------------------------------


def _check_resumable(resume: dict, path: Path, config: Config) -> None:
    dc = config.diffusion
    found = (resume.get("kind"), resume.get("preset"), resume.get("sampler"), resume.get("prediction"))
    wanted = ("diffusion", dc.preset, dc.sampler, make_sampler(dc).prediction)
    if found != wanted:
        raise ValueError(
            f"{path} holds a {found[0]} checkpoint (preset {found[1]!r}, sampler {found[2]!r}, prediction "
            f"{found[3]!r}), but the config asks for preset {wanted[1]!r}, sampler {wanted[2]!r}, prediction "
            f"{wanted[3]!r}; use another paths.work or delete that checkpoint"
        )


def _training_cases(case_store: CaseStore, latent_store: LatentStore) -> tuple[list[str], float]:
    """Train-split ids that have latents, and the latent scale factor; ValueError naming the fix."""
    encoded = latent_store.ids()
    if not encoded:
        raise ValueError(f"no latents in {latent_store.path}; run `ctdiff encode-latents` first")
    scale_factor = latent_store.scale_factor
    if scale_factor is None:
        raise ValueError(f"latent store {latent_store.path} has no scale factor; run `ctdiff encode-latents` again")
    train_ids = sorted(set(case_store.ids(split="train")) & set(encoded))
    if not train_ids:
        raise ValueError(f"none of the train cases of {case_store.path} has latents in {latent_store.path}")
    return train_ids, float(scale_factor)


def _check_sizes(config: Config, multiple: int) -> None:
    dc, tc = config.diffusion, config.train_diffusion
    if dc.window_slices % multiple:
        raise ValueError(f"diffusion.window_slices={dc.window_slices}: use a multiple of {multiple} for preset {dc.preset}")
    if tc.latent_patch is not None and tc.latent_patch % multiple:
        raise ValueError(
            f"train_diffusion.latent_patch={tc.latent_patch}: use a multiple of {multiple} for preset {dc.preset}"
        )
    if dc.overlap_slices >= dc.window_slices:
        raise ValueError(f"diffusion.overlap_slices={dc.overlap_slices}: must be below window_slices={dc.window_slices}")


def _spacings_mm(latent_store: LatentStore, case_ids: list[str]) -> dict[str, float]:
    """Median thick and thin slice spacing of the training cases: what inference reconstructs."""
    attrs = [latent_store.case_attrs(case_id) for case_id in case_ids]
    return {f"{kind}_mm": float(np.median([a[kind]["spacing_mm"][0] for a in attrs])) for kind in ("thick", "thin")}


def _restore_rng(
    saved: dict, windows: LatentWindowSampler, noise_generator: torch.Generator, dist: Distributed, seed: int, step: int
) -> None:
    if dist.enabled:  # one saved state cannot serve every rank: re-seed deterministically
        windows.set_rng_state(np.random.default_rng([seed, dist.rank, step]).bit_generator.state)
        noise_generator.manual_seed(seed * 1000 + dist.rank + step)
        torch.manual_seed(seed * 1000 + dist.rank + step)
        return
    torch.set_rng_state(saved["torch"])
    noise_generator.set_state(saved["noise"])
    windows.set_rng_state(saved["numpy"])
    if saved.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])
