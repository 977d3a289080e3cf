"""Training the CT autoencoder on random patches: L1 + KL (+ an optional PatchGAN), resumable.

What it learns follows `diffusion.base` (ctdiff.residual): with `none`, windowed thin and thick
patches (L1); with a residual base (cubic, linear), gained residuals of thin patches over that
base, with a squared-error loss: residuals are zero almost everywhere, so an L1 loss (whose
minimiser is the median) teaches the decoder to output zero, while the squared error is what
PSNR measures. Validation then scores the VAE ceiling of the formulation: base + decoded
residual of the true residual, against the true thin volume.

Resume is exact: `last.pt` holds the weights, optimiser states, step, history and every random
generator the loop draws from (torch's, CUDA's and the patch sampler's), so a run killed after
a checkpoint and started again reaches bit-identical weights to one that never stopped (CPU,
single process). Validation uses the posterior mean and draws nothing random.

Under torchrun (WORLD_SIZE > 1) the model is wrapped in DDP, each rank samples its own
patches, and only rank 0 validates and writes; there, resume re-seeds each rank from
(seed, rank, step) instead, since only one set of generator states is saved.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import numpy as np
import torch
from monai.losses import PatchAdversarialLoss
from monai.networks.nets import PatchDiscriminator
from torch import nn

from ctdiff.autoencoder import CtAutoencoder, kl_loss
from ctdiff.checkpoint import load_checkpoint, save_checkpoint
from ctdiff.config import Config, TrainVaeConfig
from ctdiff.latents import decode_latents, encode_volume
from ctdiff.metrics import score
from ctdiff.residual import RESIDUAL_GAIN, Base, base_volume, compose, is_residual, residual_target, vae_base
from ctdiff.patches import PatchSampler
from ctdiff.plots import plot_training_curves
from ctdiff.pretrained import load_pretrained
from ctdiff.store import CaseStore
from ctdiff.training_loop import Distributed, Progress, StepReporter, autocast_context, setup_distributed


def train_vae(store: CaseStore, out_dir: Path, config: Config, progress: Progress | None = None) -> dict:
    """Train, resume, or (steps=0) adopt `vae.pretrained` as it is; see the module docstring.

    Writes `last.pt`, `best.pt` (best validation PSNR) and `loss.png` under `out_dir`; returns
    {step, best_val_psnr, last, best, loss_plot (paths as str), pretrained (load report summary),
    resumed_from (the step of the last.pt found, or None)}.
    """
    tc, vc = config.train_vae, config.vae
    base = config.diffusion.base
    out_dir = Path(out_dir)
    paths = {"last": out_dir / "last.pt", "best": out_dir / "best.pt", "loss_plot": out_dir / "loss.png"}
    resume = load_checkpoint(paths["last"]) if paths["last"].is_file() else None
    if resume is not None:
        if resume.get("kind") != "vae" or resume.get("preset") != vc.preset:
            raise ValueError(
                f"{paths['last']} holds a {resume.get('preset')!r} {resume.get('kind')} checkpoint, but "
                f"vae.preset is {vc.preset!r}; use another paths.work or delete that checkpoint"
            )
        if vae_base(resume) != base:
            raise ValueError(
                f"{paths['last']} holds a VAE of base {vae_base(resume)!r}, but diffusion.base is {base!r}; "
                "use another paths.work or delete that checkpoint"
            )
        if resume["step"] >= tc.steps:  # finished already: nothing to do
            return _summary(paths, resume["step"], resume["best_val_psnr"], None, resume["step"])

    dist, device = setup_distributed(tc.device)
    model = _build_model(config, device)
    fz, fy, fx = model.factors
    if tc.patch_slices % fz or tc.patch_size % fy or tc.patch_size % fx:
        raise ValueError(
            f"train_vae.patch_slices={tc.patch_slices} and patch_size={tc.patch_size} must be multiples of "
            f"{fz} and {fy} for vae.preset={vc.preset}"
        )
    pretrained = None
    if resume is None and vc.pretrained is not None:
        pretrained = load_pretrained(model.net, vc.pretrained, vc.allow_partial).summary()
    model.to(device)
    disc = None
    if tc.adversarial_weight > 0:  # own seed: turning the GAN on leaves the VAE's noise draws as they were
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(tc.seed + 1)
            disc = _build_discriminator(vc.preset, model.preset.kind).to(device)
    opt = torch.optim.AdamW(model.net.parameters(), lr=tc.lr)
    disc_opt = torch.optim.Adam(disc.parameters(), lr=tc.lr, betas=(0.5, 0.999)) if disc is not None else None
    window = (config.preprocess.window.center_hu, config.preprocess.window.width_hu)
    sampler = PatchSampler(
        store, store.ids(split="train"), window, tc.patch_slices, tc.patch_size,
        rng=np.random.default_rng([tc.seed, dist.rank]),  # one stream per rank
        base=base,
    )
    step, best_psnr, history, resumed_from, latest_psnr = 0, -math.inf, [], None, None
    if resume is not None:
        model.net.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        if disc is not None and resume.get("discriminator") is not None:
            disc.load_state_dict(resume["discriminator"])
            disc_opt.load_state_dict(resume["disc_optimizer"])
        step, best_psnr, history = resume["step"], resume["best_val_psnr"], resume["history"]
        resumed_from = step
        latest_psnr = next((r["val_psnr"] for r in reversed(history) if r["val_psnr"] is not None), None)
        _restore_rng(resume["rng"], sampler, dist, tc.seed, step)
    elif dist.enabled:
        torch.manual_seed(tc.seed * 1000 + dist.rank)  # DDP syncs weights; noise differs per rank
    del resume

    val_ids = (store.ids(split="val") or store.ids(split="train"))[: tc.val_cases]
    autocast = autocast_context(device, tc.precision)
    train_model, train_disc = dist.wrap(model, device), dist.wrap(disc, device)
    reporter = StepReporter(progress if dist.is_main else None, step, tc.steps)
    adv_loss = PatchAdversarialLoss(criterion="least_squares")

    def save(path: Path) -> None:
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        payload = {
            "kind": "vae", "preset": vc.preset, "model": model.net.state_dict(),
            "optimizer": opt.state_dict(), "step": step, "best_val_psnr": best_psnr, "history": history,
            "rng": {"torch": torch.get_rng_state(), "numpy": sampler.rng_state(), "cuda": cuda_rng},
            "config": config.model_dump(mode="json"),
            "target": {"base": base, "residual_gain": RESIDUAL_GAIN if is_residual(base) else None},
        }
        if disc is not None:
            payload["discriminator"] = disc.state_dict()
            payload["disc_optimizer"] = disc_opt.state_dict()
        save_checkpoint(path, payload)

    def validate_and_save(row: dict, checkpoint: bool) -> None:
        nonlocal best_psnr, latest_psnr
        if dist.is_main:
            row.update(validate(model, store, val_ids, window, config.encode.chunk_slices, device, autocast, base))
            latest_psnr = row["val_psnr"]
            if row["val_psnr"] > best_psnr:
                best_psnr = row["val_psnr"]
                save(paths["best"])
            if checkpoint:
                save(paths["last"])
                plot_training_curves(history, paths["loss_plot"], title=f"VAE {vc.preset}")
        dist.barrier()

    while step < tc.steps:
        x = torch.from_numpy(sampler.sample(tc.batch_size)).to(device)  # (B, 1, D, H, W)
        use_adv = disc is not None and step >= tc.adversarial_start
        discs = (disc, train_disc) if use_adv else None
        row = _train_step(train_model, discs, opt, disc_opt, adv_loss, x, tc, autocast, squared=is_residual(base))
        step += 1
        row = {"step": step, **row, "val_psnr": None, "val_ssim": None}
        history.append(row)
        do_val = step % tc.val_every == 0 or step == tc.steps
        do_ckpt = step % tc.checkpoint_every == 0 or step == tc.steps
        if do_val:
            validate_and_save(row, checkpoint=do_ckpt)
        elif do_ckpt and dist.is_main:
            save(paths["last"])
            plot_training_curves(history, paths["loss_plot"], title=f"VAE {vc.preset}")
        reporter(step, row["loss"], latest_psnr, force=do_val or do_ckpt)

    if tc.steps == 0:  # adopt the (pretrained) weights as they are, with one validation to show their fit
        row = {"step": 0, "loss": None, "l1": None, "kl": None, "adv": None, "disc": None}
        history.append(row)
        validate_and_save(row, checkpoint=True)
        reporter(0, None, latest_psnr, force=True)
    return _summary(paths, step, best_psnr, pretrained, resumed_from)


def _summary(paths: dict, step: int, best_psnr: float, pretrained: str | None, resumed_from: int | None) -> dict:
    return {
        "step": step,
        "best_val_psnr": best_psnr if math.isfinite(best_psnr) else None,
        **{name: str(path) for name, path in paths.items()},
        "pretrained": pretrained,
        "resumed_from": resumed_from,
    }


# -- one step ------------------------------------------------------------------------------------


def _train_step(
    model: nn.Module, discs: tuple[nn.Module, nn.Module] | None, opt: torch.optim.Optimizer,
    disc_opt: torch.optim.Optimizer | None, adv_loss: PatchAdversarialLoss, x: torch.Tensor, tc: TrainVaeConfig,
    autocast: contextlib.AbstractContextManager, squared: bool = False,
) -> dict:
    """One optimiser step of the VAE, and of the discriminator when `discs` (plain, as trained:
    DDP-wrapped or the same) is given. The generator loss goes through the plain module with
    frozen weights, so DDP sees exactly one discriminator forward per backward. `squared`: the
    reconstruction term is the mean squared error (residual VAEs) instead of L1; the history
    keeps the name "l1" for either."""
    model.train()
    with autocast:
        recon, mu, sigma = model(x)  # (B, 1, D, H, W), (B, C, d, h, w) x 2
        error = recon.float() - x
        l1 = error.pow(2).mean() if squared else error.abs().mean()
        kl = kl_loss(mu.float(), sigma.float())
        loss = l1 + tc.kl_weight * kl
        adv = None
        if discs is not None:
            discs[0].requires_grad_(False)  # the generator loss must not train the discriminator
            adv = adv_loss(discs[0](recon.float())[-1], target_is_real=True, for_discriminator=False)
            loss = loss + tc.adversarial_weight * adv
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
    opt.step()
    row = {"loss": loss.item(), "l1": l1.item(), "kl": kl.item(), "adv": None, "disc": None}
    if discs is not None:
        discs[0].requires_grad_(True)
        with autocast:  # fake and real in one batch (instance norm keeps them apart): one forward
            logits = discs[1](torch.cat([recon.detach().float(), x]))[-1]
            fake, real = logits.chunk(2)
            disc_loss = 0.5 * (
                adv_loss(fake, target_is_real=False, for_discriminator=True)
                + adv_loss(real, target_is_real=True, for_discriminator=True)
            )
        disc_opt.zero_grad(set_to_none=True)
        disc_loss.backward()
        disc_opt.step()
        row.update(adv=adv.item(), disc=disc_loss.item())
    return row


class _SliceDiscriminator(nn.Module):
    """A 2D discriminator applied to every slice of (B, 1, D, H, W), for the slice presets."""

    def __init__(self, disc: nn.Module):
        super().__init__()
        self.disc = disc

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b, c, d, h, w = x.shape
        return self.disc(x.permute(0, 2, 1, 3, 4).reshape(b * d, c, h, w))  # on (B*D, C, H, W)


def _build_discriminator(preset_name: str, kind: str) -> nn.Module:
    # Kernel 3 (not PatchGAN's 4) keeps every layer's output non-empty for shallow patches
    # such as 4 slices; small channel counts because it only has to judge texture.
    disc = PatchDiscriminator(
        spatial_dims=3 if kind == "maisi" else 2, channels=8 if "tiny" in preset_name else 32,
        in_channels=1, out_channels=1, num_layers_d=3, kernel_size=3, norm="INSTANCE",
    )
    return disc if kind == "maisi" else _SliceDiscriminator(disc)


# -- validation ----------------------------------------------------------------------------------


@torch.no_grad()
def reconstruct_volume(
    model: CtAutoencoder, volume: np.ndarray, chunk_slices: int, device: torch.device,
    autocast: contextlib.AbstractContextManager = contextlib.nullcontext(),
) -> np.ndarray:
    """Posterior-mean reconstruction of a windowed (D, H, W) volume, clipped to [0, 1].

    Encoded and decoded in depth chunks exactly as the latent cache does it (ctdiff.latents),
    so validation measures what the diffusion model will be trained on.
    """
    with autocast:
        z = encode_volume(model, volume, chunk_slices, device)  # (C, d, h, w)
        recon = decode_latents(model, z, volume.shape, chunk_slices, device)  # (D, H, W)
    return np.clip(recon, 0.0, 1.0)


@torch.no_grad()
def ceiling_volume(
    model: CtAutoencoder, thin_windowed: np.ndarray, thick_windowed: np.ndarray, thick_z_mm: np.ndarray,
    thin_z_mm: np.ndarray, base: Base, chunk_slices: int, device: torch.device,
    autocast: contextlib.AbstractContextManager = contextlib.nullcontext(),
) -> np.ndarray:
    """The VAE ceiling of a formulation: the best thin volume (N, H, W) in [0, 1] that the VAE
    allows. `none`: D(E(thin)); a residual base: base + D(E(true residual)) / gain."""
    if not is_residual(base):
        return reconstruct_volume(model, thin_windowed, chunk_slices, device, autocast)
    base_thin = base_volume(thick_windowed, thick_z_mm, thin_z_mm, base)  # (N, H, W)
    with autocast:
        target = residual_target(thin_windowed, base_thin)
        z = encode_volume(model, target, chunk_slices, device)  # (C, d, h, w)
        decoded = decode_latents(model, z, target.shape, chunk_slices, device)  # (N, H, W)
    return compose(base_thin, decoded)


@torch.no_grad()
def validate(
    model: CtAutoencoder, store: CaseStore, case_ids: list[str], window: tuple[float, float],
    chunk_slices: int, device: torch.device,
    autocast: contextlib.AbstractContextManager = contextlib.nullcontext(), base: Base = "none",
) -> dict:
    """Mean PSNR (whole volume) and SSIM (2D, per thin slice) of the VAE ceiling
    (`ceiling_volume`), scored as evaluation scores them (ctdiff.metrics)."""
    was_training = model.training
    model.eval()
    psnrs, ssims = [], []
    for case_id in case_ids:
        thin, thick = store.read(case_id, "thin"), store.read(case_id, "thick")
        target = thin.window(*window)  # (D, H, W) float32 in [0, 1]
        recon = ceiling_volume(
            model, target, thick.window(*window), thick.z_mm, thin.z_mm, base, chunk_slices, device, autocast
        )
        metrics = score(recon, target, device=device)
        psnrs.append(metrics["psnr"])
        ssims.append(metrics["ssim"])
    model.train(was_training)
    return {"val_psnr": float(np.mean(psnrs)), "val_ssim": float(np.mean(ssims))}


# -- set-up ----------------------------------------------------------------------------------------


def _build_model(config: Config, device: torch.device) -> CtAutoencoder:
    torch.manual_seed(config.train_vae.seed)  # the same initial weights on every rank and run
    checkpointing = config.train_vae.grad_checkpointing
    checkpointing = device.type == "cuda" if checkpointing is None else checkpointing
    return CtAutoencoder(config.vae.preset, num_splits=config.vae.num_splits, checkpointing=checkpointing)


def _restore_rng(saved: dict, sampler: PatchSampler, dist: Distributed, seed: int, step: int) -> None:
    if dist.enabled:  # one saved state cannot serve every rank: re-seed deterministically
        sampler.set_rng_state(np.random.default_rng([seed, dist.rank, step]).bit_generator.state)
        torch.manual_seed(seed * 1000 + dist.rank + step)
        return
    torch.set_rng_state(saved["torch"])
    sampler.set_rng_state(saved["numpy"])
    if saved.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])
