"""Figures people look at instead of reading numbers: previews of ingested cases, and the view
helpers the report's figures share (mm axes, orientation letters, central coronal crop).

Orientation letters assume the usual axial acquisition (ImageOrientationPatient 1,0,0,0,1,0):
image columns run from the patient's right to left, rows from anterior to posterior, and
`z_mm` (ascending, along row × column) from inferior to superior.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from ctdiff.atomic import atomic_path
from ctdiff.fingerprint import settings_digest
from ctdiff.store import CaseStore

if TYPE_CHECKING:
    import matplotlib.pyplot as plt

_KEY_FIELD = "ctdiff-key"
_ORIENTATION = {"axial": ("R", "L", "A", "P"), "coronal": ("R", "L", "S", "I")}  # left, right, top, bottom
CORONAL_MAX_WIDTH = 2.0  # coronal views are cropped to at most this many times their z extent
TICK_FONTSIZE = 7


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only; no display on servers and pods),
    imported when a figure is drawn: a second of import that a rerun keeping its previews skips."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png_key(path: Path) -> str | None:
    if not path.is_file():
        return None
    with Image.open(path) as image:
        return image.text.get(_KEY_FIELD)


def central_columns(n_columns: int, dx_mm: float, max_width_mm: float) -> slice:
    """The central columns spanning at most `max_width_mm` (at least 8), so a coronal view much
    wider than deep is not drawn as a strip a few pixels high."""
    keep = min(n_columns, max(int(round(max_width_mm / dx_mm)), 8))
    start = (n_columns - keep) // 2
    return slice(start, start + keep)


def axial_extent_mm(shape: tuple[int, int], dy_mm: float, dx_mm: float) -> tuple[float, float, float, float]:
    """imshow extent of an (H, W) axial slice: x (mm) right to left, y (mm) anterior to posterior."""
    height, width = shape
    return (0.0, width * dx_mm, height * dy_mm, 0.0)


def coronal_extent_mm(z_mm: np.ndarray, columns: slice, dx_mm: float) -> tuple[float, float, float, float]:
    """imshow extent (origin "lower") of a (D, W') coronal image: x (mm) of the kept columns, z (mm)
    of the slices' centres, each slice drawn as its full thickness."""
    dz_mm = float(z_mm[1] - z_mm[0]) if len(z_mm) > 1 else 1.0
    return (columns.start * dx_mm, columns.stop * dx_mm, float(z_mm[0]) - dz_mm / 2, float(z_mm[-1]) + dz_mm / 2)


def show_view(ax: plt.Axes, image: np.ndarray, plane: str, extent_mm: tuple[float, float, float, float],
              **imshow_kwargs):
    """Draw an axial (H, W) or coronal (D, W) image at true aspect on mm axes (coronal: index 0,
    the lowest z, at the bottom), with orientation letters at its edges. Returns the AxesImage."""
    kwargs = {"cmap": "gray", "vmin": 0.0, "vmax": 1.0, "interpolation": "nearest"} | imshow_kwargs
    im = ax.imshow(image, extent=extent_mm, origin="upper" if plane == "axial" else "lower", aspect="equal", **kwargs)
    left, right, top, bottom = _ORIENTATION[plane]
    box = {"boxstyle": "round,pad=0.1", "facecolor": "black", "alpha": 0.5, "linewidth": 0}
    style = {"transform": ax.transAxes, "color": "yellow", "fontsize": 8, "fontweight": "bold", "bbox": box}
    ax.text(0.02, 0.5, left, ha="left", va="center", **style)
    ax.text(0.98, 0.5, right, ha="right", va="center", **style)
    ax.text(0.5, 0.98, top, ha="center", va="top", **style)
    ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)
    ax.tick_params(labelsize=TICK_FONTSIZE)
    return im


def preview_figure(thick, thin, case_id: str, center_hu: float, width_hu: float) -> plt.Figure:
    """2 × 2 grid: axial thick and thin (top), coronal thick and thin (bottom), at true aspect on
    mm axes. The coronal views show what the model is for: the thick series is blocky along z,
    the thin one is not. `thick` and `thin` are `ctdiff.volume.Volume`s of one case."""
    mid_z = len(thin.z_mm) // 2
    k_thick = int(np.argmin(np.abs(thick.z_mm - thin.z_mm[mid_z])))
    row = thin.shape[1] // 2
    dz_thin, dy, dx = thin.spacing_mm
    dz_thick = thick.spacing_mm[0]
    height, width = thin.shape[1:]
    z_span_mm = max(thin.z_mm[-1] - thin.z_mm[0] + dz_thin, thick.z_mm[-1] - thick.z_mm[0] + dz_thick)
    columns = central_columns(width, dx, CORONAL_MAX_WIDTH * z_span_mm)
    crop_mm = (columns.stop - columns.start) * dx
    axial_extent = axial_extent_mm((height, width), dy, dx)
    views = [
        ("thick, axial", "axial", thick.window(center_hu, width_hu)[k_thick], axial_extent),
        ("thin, axial", "axial", thin.window(center_hu, width_hu)[mid_z], axial_extent),
        ("thick, coronal", "coronal", thick.window(center_hu, width_hu)[:, row, columns],
         coronal_extent_mm(thick.z_mm, columns, dx)),
        ("thin, coronal", "coronal", thin.window(center_hu, width_hu)[:, row, columns],
         coronal_extent_mm(thin.z_mm, columns, dx)),
    ]
    # Panel heights follow the content: the axial row's height/width, then the coronal row's.
    ratios = [height * dy / (width * dx), z_span_mm / crop_mm]
    panel_in = 3.6
    fig, axes = pyplot().subplots(2, 2, figsize=(2 * panel_in + 0.8, panel_in * sum(ratios) + 1.6), squeeze=False,
                             gridspec_kw={"height_ratios": ratios}, constrained_layout=True)
    for ax, (title, plane, image, extent) in zip(axes.ravel(), views):
        show_view(ax, image, plane, extent)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("x (mm)", fontsize=8)
        ax.set_ylabel("y (mm)" if plane == "axial" else "z (mm)", fontsize=8)
    for ax in axes[0]:
        ax.axhline((row + 0.5) * dy, color="tab:orange", lw=0.8, ls="--")
    for ax in axes[1]:
        ax.axhline(thin.z_mm[mid_z], color="tab:cyan", lw=0.8, ls="--")
    fig.suptitle(f"{case_id}: window {center_hu:g}/{width_hu:g} HU, thick {dz_thick:g} mm, thin {dz_thin:g} mm\n"
                 f"orange: coronal plane (y = {(row + 0.5) * dy:.1f} mm) · cyan: axial slice (z = {thin.z_mm[mid_z]:.1f} mm)"
                 + (f" · coronal: central {crop_mm:.0f} mm" if columns.stop - columns.start < width else ""),
                 fontsize=10)
    return fig


def case_preview(store: CaseStore, case_id: str, center_hu: float, width_hu: float, out: Path) -> Path:
    """`preview_figure` of a stored case, windowed, written atomically (temp file + rename), with
    the case's store key and the window in the PNG's metadata; an existing preview made from the
    same is kept as it is."""
    key = settings_digest(store.case_key(case_id), center_hu, width_hu, "preview-2x2")
    if _png_key(out) == key:
        return out
    fig = preview_figure(store.read(case_id, "thick"), store.read(case_id, "thin"), case_id, center_hu, width_hu)
    try:
        with atomic_path(out) as tmp:
            fig.savefig(tmp, dpi=80, metadata={_KEY_FIELD: key})
    finally:
        pyplot().close(fig)
    return out
