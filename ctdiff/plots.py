"""Training curves as a PNG, shared by the VAE and diffusion trainers."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and pods
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ctdiff.atomic import atomic_path  # noqa: E402

_LOSS_KEYS = ("loss", "l1", "kl", "adv", "disc", "mse")  # plotted when a row holds them; others are ignored
_METRIC_KEYS = (("val_psnr", "val PSNR (dB)"), ("val_ssim", "val SSIM (unitless, 0–1)"))


def _series(history: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    rows = [(row["step"], row[key]) for row in history if row.get(key) is not None]
    if not rows:
        return np.empty(0), np.empty(0)
    steps, values = zip(*rows)
    return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (shorter at the start), so noisy per-step losses read as a trend."""
    if window <= 1 or len(values) < 2:
        return values
    cumsum = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (cumsum[1:] - cumsum[np.arange(1, len(values) + 1) - counts]) / counts


def training_curves_figure(history: list[dict], title: str = "") -> plt.Figure:
    """Loss terms (left, log scale, smoothed), validation PSNR in dB (middle) and validation SSIM
    (right) against step, each panel with its legend: the two metrics have different units and
    ranges, so they get panels of their own rather than one axis drawn over the other.

    `history` is a list of rows `{"step": int, <key>: float | None, ...}`; a key absent or None
    in a row is simply not plotted there.
    """
    fig, (ax_loss, *metric_axes) = plt.subplots(1, 1 + len(_METRIC_KEYS), figsize=(14, 4), constrained_layout=True)
    for key in _LOSS_KEYS:
        steps, values = _series(history, key)
        if len(values) and np.any(values > 0):
            window = max(1, len(values) // 50)
            ax_loss.plot(steps, _smooth(values, window), label=key if window == 1 else f"{key} (avg {window})")
    if ax_loss.lines:
        ax_loss.set_yscale("log")
        ax_loss.legend()
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss (log scale)")
    ax_loss.set_title("training loss")
    for i, (ax, (key, label)) in enumerate(zip(metric_axes, _METRIC_KEYS)):
        steps, values = _series(history, key)
        if len(values):
            ax.plot(steps, values, "o-", color=f"C{i}", label=label)
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no validation yet", ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.set_title("validation")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig


def plot_training_curves(history: list[dict], path: str | Path, title: str = "") -> Path:
    """`training_curves_figure` written atomically (temp file + rename) to `path`."""
    path = Path(path)
    fig = training_curves_figure(history, title)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=80)
    finally:
        plt.close(fig)
    return path
