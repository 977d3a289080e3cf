"""Classical interpolation along z, from thick slice positions to thin ones.

The baselines a thin-slice model has to beat (`nearest`, `linear`, `cubic`), and what inference
keeps outside the intensity window. Positions are slice centres in mm along the slice normal, as
`Volume.z_mm`; in-plane grids are the same, so only the depth axis is resampled. Target positions
beyond the first or last source slice take that slice's value (no extrapolation: CT intensities
extrapolated past the scanned range are invented).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from scipy.interpolate import CubicSpline

Method = Literal["nearest", "linear", "cubic"]
METHODS: tuple[Method, ...] = ("nearest", "linear", "cubic")
_ROWS_PER_BLOCK = 64  # cubic splines are fitted a block of rows at a time: bounded memory


def thin_positions(thick_z_mm: np.ndarray, thick_mm: float, thin_mm: float) -> np.ndarray:
    """Centres of the thin slices that tile the thick slabs, as the case store crops them.

    Thick slice k at z_k stands for [z_k - thick/2, z_k + thick/2); the thin slices are those
    with centres in [z_0 - thick/2, z_last + thick/2), `thin_mm` apart, the first half a thin
    slice in (see `ctdiff.preprocess.align`).
    """
    if thick_mm <= 0 or thin_mm <= 0:
        raise ValueError(f"slice spacings must be positive, got thick {thick_mm} mm, thin {thin_mm} mm")
    start = float(thick_z_mm[0]) - thick_mm / 2 + thin_mm / 2
    stop = float(thick_z_mm[-1]) + thick_mm / 2
    count = int(np.floor((stop - start) / thin_mm + 1e-6)) + 1
    return start + thin_mm * np.arange(count)


def interpolate_z(volume: np.ndarray, z_src_mm: np.ndarray, z_dst_mm: np.ndarray, method: Method) -> np.ndarray:
    """Resample `volume` (D, H, W) from slices at `z_src_mm` to slices at `z_dst_mm`.

    Returns float32 (len(z_dst_mm), H, W). `cubic` is a not-a-knot cubic spline through the
    source slices (linear with fewer than 4 slices, nearest with one).
    """
    z_src = np.asarray(z_src_mm, dtype=np.float64)
    z_dst = np.asarray(z_dst_mm, dtype=np.float64)
    if volume.ndim != 3 or volume.shape[0] != z_src.size:
        raise ValueError(f"volume {volume.shape} needs one source position per slice, got {z_src.size}")
    if z_src.size > 1 and np.any(np.diff(z_src) <= 0):
        raise ValueError("source positions must ascend strictly")
    if method not in METHODS:
        raise ValueError(f"unknown interpolation {method!r}; use one of {', '.join(METHODS)}")
    volume = volume.astype(np.float32, copy=False)
    z = np.clip(z_dst, z_src[0], z_src[-1])
    if z_src.size == 1 or method == "nearest":
        # Ties go to the lower slice, as np.searchsorted(side="left") on midpoints does.
        midpoints = (z_src[1:] + z_src[:-1]) / 2
        return volume[np.searchsorted(midpoints, z, side="left")]
    if method == "linear" or z_src.size < 4:
        upper = np.clip(np.searchsorted(z_src, z, side="right"), 1, z_src.size - 1)
        lower = upper - 1
        weight = ((z - z_src[lower]) / (z_src[upper] - z_src[lower])).astype(np.float32)[:, None, None]
        return (1 - weight) * volume[lower] + weight * volume[upper]
    out = np.empty((z.size, *volume.shape[1:]), dtype=np.float32)
    for row in range(0, volume.shape[1], _ROWS_PER_BLOCK):
        block = volume[:, row : row + _ROWS_PER_BLOCK]  # (D, rows, W)
        out[:, row : row + _ROWS_PER_BLOCK] = CubicSpline(z_src, block, axis=0)(z)
    return out
