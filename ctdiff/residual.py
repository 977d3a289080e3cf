"""The residual formulation: the model generates only what classical interpolation misses.

    base     = clip(interpolate_z(thick windowed, thick z, thin z, diffusion.base), 0, 1)  (N, H, W)
    residual = RESIDUAL_GAIN * (thin windowed - base)                                  (N, H, W)
    latent   = E(residual), a VAE trained on residual volumes (`train_vae` with base != none)
    output   = clip(base + D(sampled latent) / RESIDUAL_GAIN, 0, 1)

The diffusion model is conditioned on the base itself, folded onto the latent grid without loss
(`base_condition`: each f x f (x fz) block of base pixels becomes f*f (*fz) channels, SR3-style
concatenation as before). Why residuals, and why a residual VAE: a VAE that regenerates the
whole image puts its full reconstruction error on every thin slice, far above cubic
interpolation's error; on residuals its error scales with the residual, which is small where
interpolation is already right. Measured (benchmarks/RESULTS.md, "Formulation"): with the same
tiny VAEs and training, base + D(E(residual)) has a higher PSNR ceiling than the alternative
base + D(E(thin)) - D(E(base)) (latent difference, image VAE) at 8x, 4x and 2x in-plane
compression (+0.2 to +1.7 dB), and both beat the whole-image VAE by ~9 dB. `none` keeps the original formulation (the whole thin volume through
the VAE, conditioned on thick latents) for comparison and for older checkpoints.

RESIDUAL_GAIN: windowed residuals mostly lie within +-0.1; scaled by 8 they span about the
[-1, 1] a VAE initialised for image intensities handles well. It is recorded in checkpoints.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from ctdiff.interpolate import interpolate_z

Base = Literal["cubic", "linear", "none"]
BASES: tuple[Base, ...] = ("cubic", "linear", "none")
RESIDUAL_GAIN = 8.0


def is_residual(base: str) -> bool:
    if base not in BASES:
        raise ValueError(f"diffusion.base={base!r}: use one of {', '.join(BASES)}")
    return base != "none"


def vae_base(payload: dict) -> Base:
    """The formulation a VAE checkpoint was trained for (checkpoints from before it: none)."""
    return (payload.get("target") or {}).get("base", "none")


def base_volume(thick_windowed: np.ndarray, thick_z_mm: np.ndarray, thin_z_mm: np.ndarray, base: Base) -> np.ndarray:
    """The classical part of the output: `base` z-interpolation of the windowed thick volume at
    `thin_z_mm`, clipped to [0, 1] exactly as the evaluation's baseline of that name. (N, H, W)."""
    if not is_residual(base):
        raise ValueError("base none has no base volume")
    out = interpolate_z(thick_windowed, thick_z_mm, thin_z_mm, base)  # (N, H, W)
    return np.clip(out, 0.0, 1.0, out=out)


def residual_target(thin_windowed: np.ndarray, base: np.ndarray) -> np.ndarray:
    """What the residual VAE encodes: RESIDUAL_GAIN * (thin - base), float32 (N, H, W)."""
    return (RESIDUAL_GAIN * (thin_windowed.astype(np.float32) - base)).astype(np.float32)


def compose(base: np.ndarray, decoded_residual: np.ndarray) -> np.ndarray:
    """base + decoded residual / gain, clipped to [0, 1]: a thin volume from a residual."""
    out = base + decoded_residual.astype(np.float32) / np.float32(RESIDUAL_GAIN)
    return np.clip(out, 0.0, 1.0, out=out)


def condition_channels(factors: tuple[int, int, int]) -> int:
    """Channels of `base_condition` for a VAE's (dz, dy, dx) factors."""
    fz, fy, fx = factors
    return fz * fy * fx


def base_condition(base: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """The base (N, H, W) in [0, 1] folded onto the latent grid: (fz*fy*fx, d, h, w) in [-1, 1].

    Edge-padded to multiples of the factors first, as `ctdiff.latents.encode_volume` pads what
    it encodes, so the condition lines up with the latents voxel for voxel. Channel order is
    (z, y, x) within a block.
    """
    fz, fy, fx = factors
    pad = [(0, -n % f) for n, f in zip(base.shape, factors)]
    padded = np.pad(base.astype(np.float32, copy=False), pad, mode="edge")  # (D', H', W')
    d, h, w = padded.shape[0] // fz, padded.shape[1] // fy, padded.shape[2] // fx
    blocks = padded.reshape(d, fz, h, fy, w, fx).transpose(1, 3, 5, 0, 2, 4)  # (fz, fy, fx, d, h, w)
    return np.ascontiguousarray(blocks.reshape(fz * fy * fx, d, h, w)) * 2.0 - 1.0
