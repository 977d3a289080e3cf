"""Training the latent diffusion model on the latent cache: windows, EMA, best/last, resumable.

Each step draws random depth windows of thin latents with their thick-latent condition
(ctdiff.latent_windows) and minimises the sampler's loss (ctdiff.samplers) with AdamW, bf16
autocast on CUDA and gradient clipping. An exponential moving average of the weights (EMA) is
what validation, `best.pt` and inference use. Validation samples whole val cases through the
same `ThinSliceModel` that evaluation and `ctdiff infer` use: thick volume -> VAE -> windowed
sampling -> VAE decode, scored by PSNR/SSIM against the true thin volume.

The loop itself (cadence, best/last checkpoints, exact resume, DDP ranks) is
ctdiff.training_loop's `Trainer`; this module brings the model, its step, its validation and
its generators (torch's, CUDA's, the noise generator and the window sampler's). Validation
draws from its own seeded generator. Under torchrun (see ctdiff.distributed) the UNet is
wrapped in DDP and each rank draws its own windows and noise.

Checkpoint keys (plain values and tensors, `weights_only=True`): kind ("diffusion"), preset,
sampler, prediction, model (the EMA weights: what inference loads and `checkpoint_digest`
hashes), train_model (the raw weights), ema_n_averaged, optimizer, step, best_val_psnr, history,
rng {torch, noise, numpy, cuda}, config (resolved), data {train_ids (the cases the windows
draw from), val_ids, validate_on}, vae {path, relative_path, digest}, latent
{channels, condition_channels, factors, scale_factor, vae_preset}, formulation {base,
slab_consistency} (ctdiff.residual; checkpoints without it are of base none), thick_mm and
thin_mm (median of the train cases).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ctdiff.checkpoint import checkpoint_digest, load_vae
from ctdiff.config import Config
from ctdiff.diffusion import build_unet, get_preset
from ctdiff.latent_windows import LatentWindowSampler
from ctdiff.latents import LatentStore
from ctdiff.metrics import score
from ctdiff.residual import vae_base
from ctdiff.samplers import make_sampler
from ctdiff.store import CaseStore
from ctdiff.thin_slice import ThinSliceModel, vae_record
from ctdiff.training_loop import (
    Distributed, Progress, Trainer, autocast_context, generator_rng, numpy_rng, setup_distributed, torch_rngs,
    training_cases,
)

def train_diffusion(
    case_store: CaseStore, latent_store: LatentStore, vae_checkpoint: Path, out_dir: Path, config: Config,
    progress: Progress | None = None,
) -> dict:
    """Train or resume; see the module docstring.

    Writes `last.pt`, `best.pt` (best val PSNR) and `loss.png` under `out_dir`; returns {step,
    best_val_psnr, last, best, loss_plot (paths as str), resumed_from (step of the last.pt
    found, or None)}.
    """
    tc, vae_checkpoint = config.train_diffusion, Path(vae_checkpoint)
    trainer = Trainer(out_dir, config, tc)
    if trainer.resume is not None:
        _check_resumable(trainer.resume, trainer.paths["last"], config)
    if trainer.finished:
        return trainer.summary()
    train_ids = _encoded_train_ids(case_store, latent_store)
    cases = training_cases(case_store, train_ids, tc, "train_diffusion")
    vae_digest = _check_vae(vae_checkpoint, latent_store, trainer.resume, trainer.paths["last"])
    dist, device = setup_distributed(tc)
    run = _DiffusionRun(case_store, latent_store, vae_checkpoint, vae_digest, Path(out_dir), config, cases, dist,
                        device)
    return trainer.run(run, dist, cases, progress)


class _DiffusionRun:
    """The latent UNet, its EMA and its VAE as `Trainer` trains them: one `TrainingRun`."""

    def __init__(
        self, case_store: CaseStore, latent_store: LatentStore, vae_checkpoint: Path, vae_digest: str, out_dir: Path,
        config: Config, cases: dict, dist: Distributed, device: torch.device,
    ):
        dc, tc = config.diffusion, config.train_diffusion
        self.case_store, self.config, self.device = case_store, config, device
        self.val_ids, self.title = cases["val_ids"], f"diffusion {dc.preset} ({dc.sampler})"
        vae, vae_payload = load_vae(vae_checkpoint, device)
        if not vae_base(vae_payload) == latent_store.base == dc.base:
            raise ValueError(
                f"diffusion.base is {dc.base!r}, but the VAE {vae_checkpoint} was trained for base "
                f"{vae_base(vae_payload)!r} and its latents encoded for {latent_store.base!r}; train the VAE "
                "and encode the latents with the same diffusion.base"
            )
        train_ids, scale_factor = cases["train_ids"], float(latent_store.scale_factor)
        channels = int(latent_store.entry(train_ids[0])["thin_latent_shape"][0])
        multiple = get_preset(dc.preset).size_multiple
        _check_sizes(config, multiple)
        self.windows = LatentWindowSampler(
            latent_store, train_ids, dc.window_slices, tc.latent_patch, multiple, scale_factor,
            rng=np.random.default_rng(tc.seed),  # DDP ranks: re-seeded by the Trainer
        )
        torch.manual_seed(tc.seed)  # the same initial weights on every run and rank
        self.unet = build_unet(dc.preset, channels, self.windows.condition_channels).to(device)
        self.ema = AveragedModel(self.unet, multi_avg_fn=get_ema_multi_avg_fn(tc.ema_decay), use_buffers=True)
        # foreach: one kernel per step, not per tensor
        self.opt = torch.optim.AdamW(self.unet.parameters(), lr=tc.lr, foreach=True)
        self.sampler = make_sampler(dc)
        self.noise_generator = torch.Generator().manual_seed(tc.seed)  # timesteps and noise of the loss
        self.rngs = [*torch_rngs(), generator_rng("noise", self.noise_generator), numpy_rng("numpy", self.windows)]
        spacing = _spacings_mm(latent_store, train_ids)
        self.autocast = autocast_context(device, tc.precision)
        self.thin_model = ThinSliceModel(
            self.ema.module, vae, config, scale_factor, spacing["thick_mm"], spacing["thin_mm"], device
        )
        self.train_unet = dist.wrap(self.unet, device)  # DDP averages gradients across ranks; unet stays the module
        self.record = {
            "kind": "diffusion", "preset": dc.preset, "sampler": dc.sampler, "prediction": self.sampler.prediction,
            "vae": vae_record(vae_checkpoint, out_dir, vae_digest),
            "latent": {"channels": channels, "condition_channels": self.windows.condition_channels,
                       "factors": list(vae.factors), "scale_factor": scale_factor, "vae_preset": vae.preset_name},
            "formulation": {"base": dc.base, "slab_consistency": dc.slab_consistency},
            **spacing,
        }

    def load(self, checkpoint: dict) -> None:
        self.unet.load_state_dict(checkpoint["train_model"])
        self.ema.module.load_state_dict(checkpoint["model"])
        self.ema.n_averaged.fill_(checkpoint["ema_n_averaged"])
        self.opt.load_state_dict(checkpoint["optimizer"])

    def _model_fn(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with self.autocast:
            return self.train_unet(x, t)  # (B, C, D, H, W)

    def train_step(self, step: int) -> dict:
        tc = self.config.train_diffusion
        batch = self.windows.sample(tc.batch_size)
        x0, cond, mask = (torch.from_numpy(a).to(self.device) for a in batch)  # (B, C, W, h, w)
        self.unet.train()
        loss = self.sampler.training_loss(self._model_fn, x0, cond, mask, self.noise_generator)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), tc.grad_clip)
        self.opt.step()
        self.ema.update_parameters(self.unet)
        return {"loss": loss.item()}

    def validate(self) -> dict:
        return validate(self.thin_model, self.case_store, self.val_ids, self.config.train_diffusion.seed)

    def payload(self) -> dict:
        return {
            **self.record,
            "model": self.ema.module.state_dict(), "ema_n_averaged": int(self.ema.n_averaged),
            "train_model": self.unet.state_dict(), "optimizer": self.opt.state_dict(),
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


def _check_vae(vae_checkpoint: Path, latent_store: LatentStore, resume: dict | None, last: Path) -> str:
    """The VAE's digest, once the latents (and the `last.pt` to resume, if any) are found to be its."""
    vae_digest = checkpoint_digest(vae_checkpoint)
    if vae_digest != latent_store.vae_digest:
        raise ValueError(
            f"latent store {latent_store.path} holds the latents of VAE {latent_store.vae_digest}, not of "
            f"{vae_checkpoint} ({vae_digest}); run `ctdiff encode-latents` with that VAE"
        )
    if resume is not None and resume["vae"]["digest"] != vae_digest:
        raise ValueError(
            f"{last} was trained on the latents of another VAE ({resume['vae']['digest']}); "
            "use another paths.work or delete that checkpoint"
        )
    return vae_digest


def _encoded_train_ids(case_store: CaseStore, latent_store: LatentStore) -> list[str]:
    """Train-split ids that have latents (and a scale factor to use them); ValueError naming the fix."""
    encoded = latent_store.ids()
    if not encoded:
        raise ValueError(f"no latents in {latent_store.path}; run `ctdiff encode-latents` first")
    if latent_store.scale_factor is None:
        raise ValueError(f"latent store {latent_store.path} has no scale factor; run `ctdiff encode-latents` again")
    train_ids = sorted(set(case_store.ids(split="train")) & set(encoded))
    if not train_ids:
        raise ValueError(f"none of the train cases of {case_store.path} has latents in {latent_store.path}")
    return train_ids


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

