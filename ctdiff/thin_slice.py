"""The thin-slice model used by validation, evaluation and `ctdiff infer`: thick volume in, thin out.

    windowed thick (D, H, W) --VAE encode--> thick latent --condition at thin latent positions-->
    windowed sliding sampling (ctdiff.sliding) --unscale, VAE decode in chunks--> thin (n, H, W)

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
from ctdiff.samplers import StepProgress, make_sampler
from ctdiff.sliding import sample_volume
from ctdiff.train_vae import reconstruct_volume
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
        window = config.preprocess.window
        self.window = (window.center_hu, window.width_hu)
        self.size_multiple = get_preset(config.diffusion.preset).size_multiple
        self._autocast = autocast_context(self.device, config.train_diffusion.precision)  # as in training

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
        vae, _ = load_vae(vae_path, device)
        config = Config.model_validate(payload["config"])
        unet = build_unet(config.diffusion.preset, payload["latent"]["channels"])
        unet.load_state_dict(payload["model"])  # the EMA weights
        return cls(
            unet.to(device).eval(), vae, config, payload["latent"]["scale_factor"],
            payload["thick_mm"], payload["thin_mm"], device, path, checkpoint_digest(path),
        )

    def _model_fn(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with self._autocast:
            return self.unet(x, t).float()  # (B, C, D, H, W)

    @torch.no_grad()
    def predict(
        self,
        thick_windowed: np.ndarray,
        thick_z_mm: np.ndarray,
        thin_z_mm: np.ndarray,
        seed: int = 0,
        sample_steps: int | None = None,
        progress: StepProgress | None = None,
    ) -> np.ndarray:
        """Thin slices (len(thin_z_mm), H, W) float32 in [0, 1] at the ascending positions `thin_z_mm`.

        `thick_windowed` is the windowed thick volume (D, H, W) in [0, 1], its slices at
        `thick_z_mm`. The same seed gives the same volume; `progress(step, steps)` per step.
        """
        thick_z_mm, thin_z_mm = np.asarray(thick_z_mm, np.float64), np.asarray(thin_z_mm, np.float64)
        if thick_windowed.ndim != 3 or thick_windowed.shape[0] != thick_z_mm.size:
            raise ValueError(f"thick volume {thick_windowed.shape} needs one position per slice, got {thick_z_mm.size}")
        if thin_z_mm.size == 0 or np.any(np.diff(thin_z_mm) <= 0):
            raise ValueError("thin_z_mm must be non-empty and strictly ascending")
        depth_factor = self.vae.factors[0]
        chunk = self.config.encode.chunk_slices
        with self._autocast:
            thick_latent = encode_volume(self.vae, thick_windowed, chunk, self.device)  # (C, d_thick, h, w)
        cond = condition(
            thick_latent * self.scale_factor, latent_z(thick_z_mm, depth_factor), latent_z(thin_z_mm, depth_factor)
        )  # (C, d_thin, h, w)
        generator = torch.Generator().manual_seed(seed)
        dc = self.config.diffusion
        was_training = self.unet.training
        self.unet.eval()
        try:
            x0 = sample_volume(
                self.sampler, self._model_fn, torch.from_numpy(cond).to(self.device), dc.window_slices,
                dc.overlap_slices, self.size_multiple, sample_steps or dc.sample_steps, generator, progress,
            )  # (C, d_thin, h, w)
        finally:
            self.unet.train(was_training)
        latents = x0.float().cpu().numpy() / self.scale_factor
        out_shape = (thin_z_mm.size, *thick_windowed.shape[1:])
        with self._autocast:
            image = decode_latents(self.vae, latents, out_shape, chunk, self.device)  # (n_thin, H, W)
        return np.clip(image, 0.0, 1.0)

    def predictor(
        self, seed: int = 0, sample_steps: int | None = None, progress: StepProgress | None = None
    ) -> Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
        """`predict` as `ctdiff.infer.Predictor`: (thick windowed, thick z_mm, thin z_mm) -> thin."""

        def predict(thick_windowed: np.ndarray, thick_z_mm: np.ndarray, thin_z_mm: np.ndarray) -> np.ndarray:
            return self.predict(thick_windowed, thick_z_mm, thin_z_mm, seed, sample_steps, progress)

        return predict

    def reconstruct(self, windowed: np.ndarray) -> np.ndarray:
        """VAE encode/decode of a windowed volume (D, H, W), clipped to [0, 1]: the VAE ceiling."""
        return reconstruct_volume(self.vae, windowed, self.config.encode.chunk_slices, self.device, self._autocast)


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
