"""Training the CT autoencoder on random patches: L1 + KL (+ an optional PatchGAN), resumable.

What it learns follows `diffusion.base` (ctdiff.residual): with `none`, windowed thin and thick
patches (L1); with a residual base (cubic, linear), gained residuals of thin patches over that
base, with a squared-error loss: residuals are zero almost everywhere, so an L1 loss (whose
minimiser is the median) teaches the decoder to output zero, while the squared error is what
PSNR measures. Validation then scores the VAE ceiling of the formulation: base + decoded
residual of the true residual, against the true thin volume.

The loop itself (cadence, best/last checkpoints, exact resume, DDP ranks) is
ctdiff.training_loop's `Trainer`; this module brings the model, its step, its validation and
its generators (torch's, CUDA's and the patch sampler's). Validation uses the posterior mean and
draws nothing random. Under torchrun the model and discriminator are wrapped in DDP and each
rank samples its own patches.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
from monai.losses import PatchAdversarialLoss
from monai.networks.nets import PatchDiscriminator
from torch import nn

from ctdiff.autoencoder import CtAutoencoder, kl_loss
from ctdiff.config import Config, TrainVaeConfig
from ctdiff.latents import decode_latents, encode_volume
from ctdiff.metrics import score
from ctdiff.residual import RESIDUAL_GAIN, Base, base_volume, compose, is_residual, residual_target, vae_base
from ctdiff.patches import PatchSampler
from ctdiff.pretrained import load_pretrained
from ctdiff.store import CaseStore
from ctdiff.training_loop import (
    Distributed, Progress, Trainer, autocast_context, numpy_rng, setup_distributed, torch_rngs, training_cases,
)


def train_vae(store: CaseStore, out_dir: Path, config: Config, progress: Progress | None = None) -> dict:
    """Train, resume, or (steps=0) adopt `vae.pretrained` as it is; see the module docstring.

    Writes `last.pt`, `best.pt` (best validation PSNR) and `loss.png` under `out_dir`; returns
    {step, best_val_psnr, last, best, loss_plot (paths as str), pretrained (load report summary),
    resumed_from (the step of the last.pt found, or None)}.
    """
    tc = config.train_vae
    trainer = Trainer(out_dir, config, tc)
    if trainer.resume is not None:
        _check_resumable(trainer.resume, trainer.paths["last"], config)
    if trainer.finished:
        return {**trainer.summary(), "pretrained": None}
    cases = training_cases(store, store.ids(split="train"), tc, "train_vae")
    dist, device = setup_distributed(tc)
    run = _VaeRun(store, config, cases, dist, device, pretrained=trainer.resume is None)
    return {**trainer.run(run, dist, cases, progress), "pretrained": run.pretrained}


class _VaeRun:
    """The VAE (and its discriminator) as `Trainer` trains it: one `TrainingRun`."""

    def __init__(
        self, store: CaseStore, config: Config, cases: dict, dist: Distributed, device: torch.device, pretrained: bool
    ):
        tc, vc = config.train_vae, config.vae
        self.store, self.config, self.device, self.base = store, config, device, config.diffusion.base
        self.val_ids, self.title = cases["val_ids"], f"VAE {vc.preset}"
        self.model = _build_model(config, device)
        fz, fy, fx = self.model.factors
        if tc.patch_slices % fz or tc.patch_size % fy or tc.patch_size % fx:
            raise ValueError(
                f"train_vae.patch_slices={tc.patch_slices} and patch_size={tc.patch_size} must be multiples of "
                f"{fz} and {fy} for vae.preset={vc.preset}"
            )
        self.pretrained = None  # a resumed run has its own weights
        if pretrained and vc.pretrained is not None:
            self.pretrained = load_pretrained(self.model.net, vc.pretrained, vc.allow_partial).summary()
        self.model.to(device)
        self.disc = None
        if tc.adversarial_weight > 0:  # own seed: turning the GAN on leaves the VAE's noise draws as they were
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(tc.seed + 1)
                self.disc = _build_discriminator(vc.preset, self.model.preset.kind).to(device)
        self.opt = torch.optim.AdamW(self.model.net.parameters(), lr=tc.lr)
        self.disc_opt = None
        if self.disc is not None:
            self.disc_opt = torch.optim.Adam(self.disc.parameters(), lr=tc.lr, betas=(0.5, 0.999))
        self.window = (config.preprocess.window.center_hu, config.preprocess.window.width_hu)
        self.sampler = PatchSampler(
            store, cases["train_ids"], self.window, tc.patch_slices, tc.patch_size,
            rng=np.random.default_rng([tc.seed, 0]), base=self.base,  # DDP ranks: re-seeded by the Trainer
        )
        self.rngs = [*torch_rngs(), numpy_rng("numpy", self.sampler)]
        self.autocast = autocast_context(device, tc.precision)
        self.train_model, self.train_disc = dist.wrap(self.model, device), dist.wrap(self.disc, device)
        self.adv_loss = PatchAdversarialLoss(criterion="least_squares")

    def load(self, checkpoint: dict) -> None:
        self.model.net.load_state_dict(checkpoint["model"])
        self.opt.load_state_dict(checkpoint["optimizer"])
        if self.disc is not None and checkpoint.get("discriminator") is not None:
            self.disc.load_state_dict(checkpoint["discriminator"])
            self.disc_opt.load_state_dict(checkpoint["disc_optimizer"])

    def train_step(self, step: int) -> dict:
        tc = self.config.train_vae
        x = torch.from_numpy(self.sampler.sample(tc.batch_size)).to(self.device)  # (B, 1, D, H, W)
        discs = (self.disc, self.train_disc) if self.disc is not None and step >= tc.adversarial_start else None
        return _train_step(self.train_model, discs, self.opt, self.disc_opt, self.adv_loss, x, tc, self.autocast,
                           squared=is_residual(self.base))

    def validate(self) -> dict:
        return validate(self.model, self.store, self.val_ids, self.window, self.config.encode.chunk_slices,
                        self.device, self.autocast, self.base)

    def payload(self) -> dict:
        payload = {
            "kind": "vae", "preset": self.config.vae.preset, "model": self.model.net.state_dict(),
            "optimizer": self.opt.state_dict(),
            "target": {"base": self.base, "residual_gain": RESIDUAL_GAIN if is_residual(self.base) else None},
        }
        if self.disc is not None:
            payload["discriminator"] = self.disc.state_dict()
            payload["disc_optimizer"] = self.disc_opt.state_dict()
        return payload


def _check_resumable(resume: dict, path: Path, config: Config) -> None:
    preset, base = config.vae.preset, config.diffusion.base
    if resume.get("kind") != "vae" or resume.get("preset") != preset:
        raise ValueError(
            f"{path} holds a {resume.get('preset')!r} {resume.get('kind')} checkpoint, but "
            f"vae.preset is {preset!r}; use another paths.work or delete that checkpoint"
        )
    if vae_base(resume) != base:
        raise ValueError(
            f"{path} holds a VAE of base {vae_base(resume)!r}, but diffusion.base is {base!r}; "
            "use another paths.work or delete that checkpoint"
        )


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

