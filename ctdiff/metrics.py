"""Image quality of a predicted thin volume against the true one: PSNR and SSIM (SPEC §6).

Both volumes are windowed thin volumes scaled to [0, 1], so the data range is 1. The numbers
are MONAI's (`PSNRMetric`, `SSIMMetric`), computed over a chosen set of thin slices:
- PSNR is one number for the selected slices together: 10 log10(1 / MSE) with the MSE over all
  their voxels. A mean of per-slice PSNRs would be dominated by near-empty slices (and is
  infinite for any slice predicted exactly).
- SSIM is 2-D, per axial slice, averaged over the selected slices: what the thin-slice
  literature reports, and cheap. A 3-D SSIM would mix the z axis (whose resolution is what the
  model restores) into every window and its 11-slice window does not fit short selections such
  as the in-between slices. MONAI's defaults: Gaussian window 11, sigma 1.5, k1 0.01, k2 0.03,
  averaged over the "valid" window positions (no padding), as scikit-image's
  `structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`.

Blur wins PSNR: the mean of many plausible thin volumes scores better than any one of them. So a
third figure, `hist_w1_hu`, asks whether the prediction has the intensities of real thin slices:
the Wasserstein-1 distance between the intensity histograms of prediction and truth over the
body voxels of the selected slices, in HU (windowed units times the window width). A blurred
prediction has too few of the extreme values (contrast-filled vessels, fat, noise) and pays for
it here, a sharp one does not. Equal voxel sets make it the mean absolute difference of the
sorted values (scipy.stats.wasserstein_distance gives the same).
"""

from __future__ import annotations

import numpy as np
import torch

DATA_RANGE = 1.0  # windowed volumes live in [0, 1]
SSIM_WINDOW = 11  # MONAI's and Wang et al.'s Gaussian window, shrunk only for smaller slices
_SSIM_BATCH_SLICES = 16  # slices per SSIM call: five (B, H, W) float maps each, memory stays bounded
Device = str | torch.device | None  # None: CUDA when available (SSIM of a full case is slow on a CPU)


def score(
    pred: np.ndarray, truth: np.ndarray, slice_mask: np.ndarray | None = None, device: Device = None,
    width_hu: float | None = None,
) -> dict[str, float]:
    """{"psnr" (dB), "ssim"} of `pred` against `truth`, both windowed (D, H, W) in [0, 1], and
    "hist_w1_hu" when the window width `width_hu` is given.

    `slice_mask` (D,) bool picks the slices to score (default: all). PSNR is infinite when the
    selected slices are predicted exactly, as scikit-image returns it.
    """
    return score_regions(pred, truth, {"slice_mask": slice_mask}, device, width_hu)["slice_mask"]


def score_regions(
    pred: np.ndarray, truth: np.ndarray, masks: dict[str, np.ndarray | None], device: Device = None,
    width_hu: float | None = None,
) -> dict[str, dict[str, float]]:
    """`score` for several slice masks at once (None = all slices): the per-slice SSIMs, the
    costly part, are computed once for the slices any mask selects."""
    if pred.shape != truth.shape or pred.ndim != 3:
        raise ValueError(f"prediction {pred.shape} and truth {truth.shape} must be the same (D, H, W)")
    full = np.ones(truth.shape[0], dtype=bool)
    masks = {name: full if mask is None else np.asarray(mask, dtype=bool) for name, mask in masks.items()}
    for name, mask in masks.items():
        if mask.shape != full.shape:
            raise ValueError(f"slice mask {name!r} {mask.shape} needs one flag per slice ({truth.shape[0]})")
        if not mask.any():
            raise ValueError(f"slice mask {name!r} selects no slice")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pred_t = torch.from_numpy(np.ascontiguousarray(pred, dtype=np.float32)).to(device)  # (D, H, W)
    truth_t = torch.from_numpy(np.ascontiguousarray(truth, dtype=np.float32)).to(device)
    needed = np.logical_or.reduce(list(masks.values()))
    index = torch.from_numpy(needed).to(device)
    ssim = np.full(truth.shape[0], np.nan)  # (D,), NaN where no mask looks
    ssim[needed] = slice_ssim(pred_t[index], truth_t[index])
    out = {}
    for name, mask in masks.items():
        index = torch.from_numpy(mask).to(device)
        out[name] = {"psnr": psnr(pred_t[index], truth_t[index]), "ssim": float(ssim[mask].mean())}
        if width_hu is not None:
            out[name]["hist_w1_hu"] = histogram_w1_hu(pred[mask], truth[mask], width_hu)
    return out


def body_mask(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Voxels above the window floor in the truth or the prediction: the body's tissue that the
    window shows (air and lung sit at 0 after windowing and tell nothing)."""
    return (truth > 0.0) | (pred > 0.0)


def histogram_w1_hu(pred: np.ndarray, truth: np.ndarray, width_hu: float) -> float:
    """Wasserstein-1 distance (HU) between the intensity histograms of two windowed volumes
    over their `body_mask`; 0 when no voxel is in the body."""
    mask = body_mask(pred, truth)
    if not mask.any():
        return 0.0
    a = np.sort(pred[mask].astype(np.float64))
    b = np.sort(truth[mask].astype(np.float64))
    return float(np.abs(a - b).mean() * width_hu)


def psnr(pred: torch.Tensor, truth: torch.Tensor) -> float:
    """PSNR (dB) of (S, H, W) slices taken together, data range 1."""
    from monai.metrics import PSNRMetric  # MONAI's import (~1.3 s) only where a score is computed

    metric = PSNRMetric(max_val=DATA_RANGE)
    return float(metric(pred[None, None], truth[None, None]).item())  # one (1, 1, S, H, W) item


def slice_ssim(pred: torch.Tensor, truth: torch.Tensor) -> np.ndarray:
    """(S,) 2-D SSIM of each (H, W) slice of (S, H, W), data range 1."""
    from monai.metrics import SSIMMetric

    size = min(SSIM_WINDOW, *truth.shape[1:])
    metric = SSIMMetric(spatial_dims=2, data_range=DATA_RANGE, win_size=size - 1 + size % 2)  # odd
    per_slice = []
    for start in range(0, truth.shape[0], _SSIM_BATCH_SLICES):
        stop = start + _SSIM_BATCH_SLICES
        per_slice.append(metric(pred[start:stop, None], truth[start:stop, None])[:, 0])  # slices as the batch
    return torch.cat(per_slice).double().cpu().numpy()


def in_between_mask(thick_z_mm: np.ndarray, thin_z_mm: np.ndarray, tolerance_mm: float | None = None) -> np.ndarray:
    """(len(thin_z_mm),) bool: thin slices farther than `tolerance_mm` from every thick centre.

    These are the slices the thick series has no slice at: where interpolation (and the model)
    has to invent content. With 5 mm -> 1 mm, 4 of every 5 thin slices; with 3 mm -> 1 mm, 2 of
    3; with an even ratio such as 2 mm -> 1 mm, all of them. The default tolerance is a quarter
    of the thin spacing, far above the rounding of positions and far below a slice.
    """
    thick = np.sort(np.asarray(thick_z_mm, dtype=np.float64))
    thin = np.asarray(thin_z_mm, dtype=np.float64)
    if thick.size == 0:
        raise ValueError("no thick slice positions")
    if tolerance_mm is None:
        steps = np.diff(np.sort(thin))
        tolerance_mm = 0.25 * float(steps.min()) if steps.size else 0.01
    upper = np.clip(np.searchsorted(thick, thin), 0, thick.size - 1)
    lower = np.clip(upper - 1, 0, thick.size - 1)
    distance_mm = np.minimum(np.abs(thin - thick[upper]), np.abs(thin - thick[lower]))
    return distance_mm > tolerance_mm
