"""The thin-slice model used by validation, evaluation and `ctdiff infer`: thick volume in, thin out.

Residual formulation (`diffusion.base` cubic or linear, ctdiff.residual):

    windowed thick (D, H, W) --base interpolation--> base (n, H, W) --fold onto latent grid-->
    condition --windowed sliding sampling (ctdiff.sliding), K seeds batched--> residual latents
    --unscale, VAE decode in chunks--> base + residual (n, H, W), per sample

Original formulation (`none`, and checkpoints from before the residual one):

    windowed thick --VAE encode--> thick latent --condition at thin latent positions--> sampling
    --unscale, VAE decode--> thin (n, H, W)

Then, optionally, each sample is moved to agree with the measured thick slabs (ctdiff.slab),
and the K samples give the prediction (their mean) and its uncertainty (their per-voxel std).

`ThinSliceModel.load` builds it from a diffusion checkpoint: the EMA weights, and the VAE the
checkpoint records (by path and content digest; a different VAE would decode other latents).
Training builds one from its in-memory modules, so validation runs this same code.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ctdiff.autoencoder import CtAutoencoder
from ctdiff.checkpoint import checkpoint_digest, load_checkpoint, load_vae
from ctdiff.config import Config
from ctdiff.diffusion import build_unet, condition, get_preset, latent_z
from ctdiff.latents import decode_latents, encode_volume
from ctdiff.provenance import trained_inplane_px
from ctdiff.residual import base_condition, base_volume, compose, is_residual, vae_base
from ctdiff.samplers import StepProgress, make_sampler
from ctdiff.slab import project_to_slabs
from ctdiff.sliding import sample_volume
from ctdiff.train_vae import ceiling_volume
from ctdiff.training_loop import autocast_context


class ThinSliceModel:
    """A diffusion UNet (EMA weights) and its VAE, with the settings they were trained with."""

    def __init__(
        self,
        unet: nn.Module,
        vae: CtAutoencoder,
        config: Config,
        scale_factor: float,
        thick_mm: float,
        thin_mm: float,
        device: str | torch.device = "cpu",
        path: Path | None = None,
        digest: str | None = None,
    ):
        self.unet, self.vae, self.config = unet, vae, config
        self.sampler = make_sampler(config.diffusion)
        self.scale_factor = float(scale_factor)
        self.thick_mm, self.thin_mm = float(thick_mm), float(thin_mm)
        self.device = torch.device(device)
        self.path, self.digest = path, digest
        self.vae_digest: str | None = None  # the VAE's weights, when loaded from a checkpoint
        self.inplane_px: tuple[int, int] | None = None  # (H, W) of its training cases, when known
        window = config.preprocess.window
        self.window = (window.center_hu, window.width_hu)
        self.base = config.diffusion.base
        self.slab_consistency = config.diffusion.slab_consistency
        self.size_multiple = get_preset(config.diffusion.preset).size_multiple
        self.latent_channels = int(unet.out_channels)
        self._autocast = autocast_context(self.device, config.train_diffusion.precision)  # as in training

    @property
    def resolution(self) -> int | None:
        """The square in-plane size of the cases it trained on (ctdiff.provenance), which
        inference resizes its input to; None: unknown or not square (inputs are used as they are)."""
        size = self.inplane_px
        return size[0] if size is not None and size[0] == size[1] else None

    @property
    def sampler_name(self) -> str:
        return self.sampler.name

    @property
    def sample_steps(self) -> int:
        return self.config.diffusion.sample_steps

    @classmethod
    def load(cls, checkpoint_path: str | Path, device: str | torch.device = "cpu") -> "ThinSliceModel":
        """The model of a diffusion checkpoint (`best.pt` or `last.pt`), in eval mode on `device`."""
        path = Path(checkpoint_path)
        if not path.is_file():
            raise ValueError(f"no such diffusion checkpoint: {path}")
        payload = load_checkpoint(path)
        if payload.get("kind") != "diffusion":
            raise ValueError(f"{path} is not a ctdiff diffusion checkpoint (kind={payload.get('kind')!r})")
        vae_path = _find_vae(path, payload["vae"])
        vae, vae_payload = load_vae(vae_path, device)
        formulation = payload.get("formulation")
        if formulation is None:  # from before the residual formulation: the whole image, no slab step
            formulation = {"base": "none", "slab_consistency": False}
        config = Config.model_validate(payload["config"])
        config.diffusion.base = formulation["base"]
        config.diffusion.slab_consistency = formulation["slab_consistency"]
        if vae_base(vae_payload) != config.diffusion.base:
            raise ValueError(
                f"{path} was trained for base {config.diffusion.base!r}, but its VAE {vae_path} for "
                f"{vae_base(vae_payload)!r}; restore the VAE it was trained with"
            )
        unet = build_unet(config.diffusion.preset, payload["latent"]["channels"], payload["latent"].get("condition_channels"))
        unet.load_state_dict(payload["model"])  # the EMA weights
        model = cls(
            unet.to(device).eval(), vae, config, payload["latent"]["scale_factor"],
            payload["thick_mm"], payload["thin_mm"], device, path, checkpoint_digest(path),
        )
        model.vae_digest = payload["vae"]["digest"]
        model.inplane_px = trained_inplane_px(payload)
        return model

    def _model_fn(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with self._autocast:
            return self.unet(x, t).float()  # (B, C, D, H, W)

    @torch.no_grad()
    def draw(
        self,
        thick_windowed: np.ndarray,
        thick_z_mm: np.ndarray,
        thin_z_mm: np.ndarray,
        seeds: list[int],
        sample_steps: int | None = None,
        progress: StepProgress | None = None,
    ) -> np.ndarray:
        """Samples (K, len(thin_z_mm), H, W) float32 in [0, 1], one per seed, before any slab step.

        `thick_windowed` is the windowed thick volume (D, H, W) in [0, 1], its slices at the
        ascending `thick_z_mm`; `thin_z_mm` ascending. The K samples are sampled as one batch;
        sample k equals what `draw` gives for seeds[k] alone. `progress(step, steps)` per step.
        """
        thick_z_mm, thin_z_mm = np.asarray(thick_z_mm, np.float64), np.asarray(thin_z_mm, np.float64)
        if thick_windowed.ndim != 3 or thick_windowed.shape[0] != thick_z_mm.size:
            raise ValueError(f"thick volume {thick_windowed.shape} needs one position per slice, got {thick_z_mm.size}")
        if thin_z_mm.size == 0 or np.any(np.diff(thin_z_mm) <= 0):
            raise ValueError("thin_z_mm must be non-empty and strictly ascending")
        if not seeds:
            raise ValueError("draw at least one sample")
        chunk = self.config.encode.chunk_slices
        out_shape = (thin_z_mm.size, *thick_windowed.shape[1:])
        base = None
        if is_residual(self.base):
            base = base_volume(thick_windowed, thick_z_mm, thin_z_mm, self.base)  # (n, H, W)
            cond = base_condition(base, self.vae.factors)  # (C_cond, d, h, w)
        else:
            depth_factor = self.vae.factors[0]
            with self._autocast:
                thick_latent = encode_volume(self.vae, thick_windowed, chunk, self.device)  # (C, d_thick, h, w)
            cond = condition(
                thick_latent * self.scale_factor, latent_z(thick_z_mm, depth_factor), latent_z(thin_z_mm, depth_factor)
            )  # (C, d_thin, h, w)
        generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        dc = self.config.diffusion
        was_training = self.unet.training
        self.unet.eval()
        try:
            x0 = sample_volume(
                self.sampler, self._model_fn, torch.from_numpy(cond).to(self.device), dc.window_slices,
                dc.overlap_slices, self.size_multiple, sample_steps or dc.sample_steps, generators, progress,
                channels=self.latent_channels,
            )  # (K, C, d_thin, h, w)
        finally:
            self.unet.train(was_training)
        samples = np.empty((len(seeds), *out_shape), dtype=np.float32)
        for k, latents in enumerate(x0.float().cpu().numpy() / self.scale_factor):
            with self._autocast:
                decoded = decode_latents(self.vae, latents, out_shape, chunk, self.device)  # (n_thin, H, W)
            samples[k] = compose(base, decoded) if base is not None else np.clip(decoded, 0.0, 1.0)
        return samples

    def finish(
        self, samples: np.ndarray, thick_windowed: np.ndarray, thick_z_mm: np.ndarray, thin_z_mm: np.ndarray,
        slab_consistency: bool | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """(mean, std), each (n, H, W) float32, of samples (K, n, H, W) from `draw`, each first
        moved onto the thick slabs when `slab_consistency` (default: the model's setting). The
        std is None for one sample: a spread of one sample says nothing."""
        slab = self.slab_consistency if slab_consistency is None else slab_consistency
        if slab:
            samples = np.stack([project_to_slabs(s, thick_windowed, thick_z_mm, thin_z_mm, self.thick_mm) for s in samples])
        return samples.mean(axis=0), (samples.std(axis=0) if len(samples) > 1 else None)

    def predict_with_std(
        self, thick_windowed: np.ndarray, thick_z_mm: np.ndarray, thin_z_mm: np.ndarray, seed: int = 0,
        samples: int = 1, sample_steps: int | None = None, progress: StepProgress | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The posterior mean of `samples` samples (seeds seed..seed+K-1) and their per-voxel
        std (None for one sample), both (len(thin_z_mm), H, W) float32 in windowed units; see `draw` and `finish`."""
        drawn = self.draw(thick_windowed, thick_z_mm, thin_z_mm, list(range(seed, seed + samples)), sample_steps, progress)
        return self.finish(drawn, thick_windowed, thick_z_mm, thin_z_mm)

    def predict(
        self,
        thick_windowed: np.ndarray,
        thick_z_mm: np.ndarray,
        thin_z_mm: np.ndarray,
        seed: int = 0,
        sample_steps: int | None = None,
        progress: StepProgress | None = None,
        samples: int = 1,
    ) -> np.ndarray:
        """Thin slices (len(thin_z_mm), H, W) float32 in [0, 1] at the ascending positions
        `thin_z_mm`: the mean of `predict_with_std`. The same seed gives the same volume."""
        return self.predict_with_std(thick_windowed, thick_z_mm, thin_z_mm, seed, samples, sample_steps, progress)[0]

    def predictor(
        self, seed: int = 0, sample_steps: int | None = None, progress: StepProgress | None = None, samples: int = 1,
    ) -> Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray | None]]:
        """`predict_with_std` as `ctdiff.infer.Predictor`: (thick windowed, thick z_mm, thin z_mm)
        -> (mean, std); with one sample the std is None and no uncertainty map is written."""

        def predict(thick_windowed: np.ndarray, thick_z_mm: np.ndarray, thin_z_mm: np.ndarray):
            return self.predict_with_std(thick_windowed, thick_z_mm, thin_z_mm, seed, samples, sample_steps, progress)

        return predict

    def ceiling(
        self, thin_windowed: np.ndarray, thick_windowed: np.ndarray, thick_z_mm: np.ndarray, thin_z_mm: np.ndarray,
        slab_consistency: bool | None = None,
    ) -> np.ndarray:
        """The VAE ceiling under this model's formulation (ctdiff.train_vae.ceiling_volume), with
        the model's slab step: the best output its VAE allows. (n, H, W) in [0, 1]."""
        recon = ceiling_volume(
            self.vae, thin_windowed, thick_windowed, thick_z_mm, thin_z_mm, self.base,
            self.config.encode.chunk_slices, self.device, self._autocast,
        )
        return self.finish(recon[None], thick_windowed, thick_z_mm, thin_z_mm, slab_consistency)[0]


def _find_vae(checkpoint_path: Path, vae: dict) -> Path:
    """The recorded VAE: at its path, else at the same place relative to the diffusion checkpoint
    (a moved work folder); refused unless its content digest matches."""
    candidates = [Path(vae["path"]), checkpoint_path.parent / vae.get("relative_path", vae["path"])]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise ValueError(
            f"{checkpoint_path} needs its VAE checkpoint {vae['path']}, which is missing; "
            "restore it (the latents this model learned come from that VAE)"
        )
    digest = checkpoint_digest(found)
    if digest != vae["digest"]:
        raise ValueError(
            f"VAE checkpoint {found} has digest {digest}, but {checkpoint_path} was trained on the latents "
            f"of {vae['digest']}; restore that VAE or retrain the diffusion model"
        )
    return found


def vae_record(vae_path: Path, out_dir: Path, digest: str) -> dict:
    """How a diffusion checkpoint names its VAE: absolute path, path from `out_dir`, digest."""
    vae_path = Path(vae_path).resolve()
    return {"path": str(vae_path), "relative_path": os.path.relpath(vae_path, Path(out_dir).resolve()), "digest": digest}
