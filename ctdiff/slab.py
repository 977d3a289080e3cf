"""Thick-slab consistency: make predicted thin slices average to the thick slab they came from.

The thick series was measured; the thin slices were not. If a thick slice is the mean of the
thin slices its slab covers, the thin volume that agrees best with it (least squares, each slab
on its own) is the prediction plus, on every thin slice of a slab, the slab's shortfall

    thin_j <- thin_j + (thick_k - mean_{i in slab k} thin_i)        for every j in slab k

This is the orthogonal projection onto {thin : slab means = thick}: it leaves any detail that
averages to zero within a slab (what the model adds between slab centres) untouched and only
moves each slab's mean.

What it assumes, and where real data differ:
- A **box** slice-sensitivity profile: thick slice k is the plain mean of the thin slices whose
  centres lie within half a thick spacing of its centre. Real scanners reconstruct thick
  slices with a smooth slice-sensitivity profile (roughly triangular or Gaussian, wider than
  the nominal thickness) and apply their own kernel, so on real studies the projection forces
  a slightly wrong mean; it is an option (`diffusion.slab_consistency`), chosen by measurement.
  ctdiff's synthetic cases do make thick slices as box means of the thin ones (plus their own
  noise).
- Linearity: windowing clips, and the mean of clipped values is not the clipped mean. Voxels
  whose thick value lies at or outside the window (0 or 1 after windowing) are left alone,
  where the constraint says too little (a slab at the window floor may hold any values below
  it). The result is clipped back to [0, 1] afterwards, so it is a projection only where no
  thin voxel leaves the window.
- Thin slices outside every slab (none in the case store, which crops thin to the thick
  extent) are left alone.
"""

from __future__ import annotations

import numpy as np


def slab_index(thick_z_mm: np.ndarray, thin_z_mm: np.ndarray, thick_mm: float | None = None) -> np.ndarray:
    """(len(thin_z_mm),) int: the thick slab each thin slice lies in, -1 for none.

    Slab k covers [z_k - thick/2, z_k + thick/2); `thick_mm` defaults to the median spacing of
    the thick positions (ascending). A centre on a shared border goes to the upper slab, as the
    case store's crop counts it.
    """
    thick = np.asarray(thick_z_mm, dtype=np.float64)
    thin = np.asarray(thin_z_mm, dtype=np.float64)
    if thick.ndim != 1 or thick.size == 0 or np.any(np.diff(thick) <= 0):
        raise ValueError("thick positions must be a non-empty ascending 1D array")
    if thick_mm is None:
        if thick.size < 2:
            raise ValueError("a single thick slice needs thick_mm")
        thick_mm = float(np.median(np.diff(thick)))
    if not thick_mm > 0:
        raise ValueError(f"thick_mm must be positive, got {thick_mm}")
    nearest = np.clip(np.searchsorted(thick, thin), 0, thick.size - 1)
    lower = np.clip(nearest - 1, 0, thick.size - 1)
    nearest = np.where(np.abs(thin - thick[lower]) < np.abs(thin - thick[nearest]), lower, nearest)
    offset = thin - thick[nearest]
    inside = (offset >= -thick_mm / 2 - 1e-6) & (offset < thick_mm / 2 - 1e-6)
    return np.where(inside, nearest, -1)


def project_to_slabs(
    thin: np.ndarray, thick: np.ndarray, thick_z_mm: np.ndarray, thin_z_mm: np.ndarray, thick_mm: float | None = None
) -> np.ndarray:
    """`thin` (N, H, W) windowed in [0, 1], moved so each slab's mean equals `thick` (D, H, W).

    See the module docstring for the projection and what it assumes. Returns a new float32
    array clipped to [0, 1]; `thin` is not modified.
    """
    if thin.ndim != 3 or thick.ndim != 3 or thin.shape[1:] != thick.shape[1:]:
        raise ValueError(f"thin {thin.shape} and thick {thick.shape} must be (N, H, W) and (D, H, W) on one grid")
    if thick.shape[0] != len(thick_z_mm) or thin.shape[0] != len(thin_z_mm):
        raise ValueError("one position per slice is needed for thin and thick")
    index = slab_index(thick_z_mm, thin_z_mm, thick_mm)
    out = np.array(thin, dtype=np.float32, copy=True)
    for k in np.unique(index[index >= 0]):
        members = np.nonzero(index == k)[0]
        measured = thick[k].astype(np.float32)  # (H, W)
        free = (measured > 0.0) & (measured < 1.0)  # inside the window: the constraint holds
        shortfall = np.where(free, measured - out[members].mean(axis=0), 0.0)  # (H, W)
        out[members] += shortfall[None]
    return np.clip(out, 0.0, 1.0, out=out)
