"""Sampling a thin latent of any depth in overlapping depth windows, blended at every step.

The network was trained on windows of `window_slices` latent slices, so a whole volume is
denoised MultiDiffusion-style (Bar-Tal et al. 2023): at every denoising step the network runs on
every window, the windows' outputs are blended with weights that taper towards the window ends
(MONAI's `sliding_window_inference` with a linear ramp over the overlap), and the sampler takes
one step on the whole volume. Blending once per step, rather than sampling windows apart and
stitching the results, keeps neighbouring windows on one trajectory: no seams.

Volumes shorter than a window, and in-plane sizes that are not a multiple of the network's
`size_multiple`, are padded at the far end as in training (ctdiff.latent_windows): zero condition,
noise evolving like the rest, cropped at the end.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference

from ctdiff.samplers import Generators, ModelFn, Sampler, StepProgress

DEFAULT_WINDOW_BATCH = 2  # windows per network call


def padded_size(size: int, multiple: int, minimum: int = 1) -> int:
    """The smallest multiple of `multiple` that is at least `size` and `minimum`."""
    return multiple * math.ceil(max(size, minimum) / multiple)


def overlap_fraction(window_slices: int, overlap_slices: int) -> float:
    """MONAI's overlap fraction that gives windows exactly `window_slices - overlap_slices` apart.

    MONAI takes int(window * (1 - fraction)) as the stride; a quarter slice of slack keeps float
    rounding from shortening it by one.
    """
    if not 0 <= overlap_slices < window_slices:
        raise ValueError(
            f"diffusion.overlap_slices={overlap_slices}: use 0 to window_slices - 1 ({window_slices - 1})"
        )
    return 0.0 if overlap_slices == 0 else (overlap_slices - 0.25) / window_slices


def depth_ramp(window_slices: int, overlap_slices: int) -> torch.Tensor:
    """Blending weights (window,) rising linearly over the first `overlap_slices` and falling over
    the last: neighbouring windows `window - overlap` apart cross-fade linearly and their weights
    sum to 1. (MONAI's Gaussian map with nnU-Net's sigma of 1/8 window swaps windows within ~2
    slices: a near-seam for overlaps of a quarter window.) Strictly positive, so slices that only
    one window covers keep its prediction."""
    if overlap_slices == 0:
        return torch.ones(window_slices)
    centres = torch.arange(window_slices) + 0.5
    return (torch.minimum(centres, window_slices - centres) / overlap_slices).clamp(max=1.0)


def windowed(
    model_fn: ModelFn, window_slices: int, overlap_slices: int, window_batch: int = DEFAULT_WINDOW_BATCH
) -> ModelFn:
    """`model_fn` applied to overlapping depth windows of its input and blended (see the docstring).

    The input depth must be at least `window_slices`; every window is exactly that deep and
    spans the whole plane.
    """
    overlap = overlap_fraction(window_slices, overlap_slices)
    ramp = depth_ramp(window_slices, overlap_slices)

    def predictor(windows: torch.Tensor, t_volume: torch.Tensor) -> torch.Tensor:
        return model_fn(windows, t_volume.expand(windows.shape[0])).float()  # (n, C, window, H, W)

    def blended(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        batch, _, depth, height, width = x.shape  # (B, 2C, D, H, W)
        if depth < window_slices:
            raise ValueError(f"depth {depth} is shorter than a window of {window_slices}; pad it first")
        weights = ramp.to(x.device)[:, None, None].expand(window_slices, height, width)  # (window, H, W)
        return torch.cat([  # volume by volume: the windows of one volume share its timestep
            sliding_window_inference(
                x[b : b + 1], (window_slices, height, width), window_batch, predictor,
                overlap=(overlap, 0.0, 0.0), roi_weight_map=weights, t_volume=t[b : b + 1],
            )
            for b in range(batch)
        ])  # (B, C, D, H, W)

    return blended


def sample_volume(
    sampler: Sampler,
    model_fn: ModelFn,
    cond: torch.Tensor,
    window_slices: int,
    overlap_slices: int,
    size_multiple: int,
    steps: int,
    generator: Generators,
    progress: StepProgress | None = None,
    window_batch: int = DEFAULT_WINDOW_BATCH,
    channels: int | None = None,
) -> torch.Tensor:
    """Clean latents for a condition (C_cond, D, H, W) of any depth, by windowed sampling:
    (channels, D, H, W) for one generator, (K, channels, D, H, W) for a list of K generators
    (K samples of one condition, batched; sample k equals the one generator k alone gives).

    `channels` defaults to C_cond. Deterministic for the generators' states.
    `progress(step, steps)` after every denoising step.
    """
    if window_slices % size_multiple:
        raise ValueError(
            f"diffusion.window_slices={window_slices}: must be a multiple of {size_multiple} for this preset"
        )
    _, depth, height, width = cond.shape
    target = (
        padded_size(depth, 1, window_slices),
        padded_size(height, size_multiple),
        padded_size(width, size_multiple),
    )
    pad = (0, target[2] - width, 0, target[1] - height, 0, target[0] - depth)
    batch = 1 if isinstance(generator, torch.Generator) else len(generator)
    padded = F.pad(cond, pad)[None].expand(batch, -1, -1, -1, -1)  # (K, C_cond, D', H', W'), zeros beyond the volume
    x0 = sampler.sample(
        windowed(model_fn, window_slices, overlap_slices, window_batch), padded, steps, generator, progress, channels
    )  # (K, C, D', H', W')
    x0 = x0[:, :, :depth, :height, :width]
    return x0[0] if isinstance(generator, torch.Generator) else x0
