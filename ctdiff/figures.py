"""Figures people look at instead of reading numbers: previews of ingested cases."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and pods
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from PIL import Image  # noqa: E402

from ctdiff.atomic import atomic_path  # noqa: E402
from ctdiff.fingerprint import settings_digest  # noqa: E402
from ctdiff.store import CaseStore  # noqa: E402

_KEY_FIELD = "ctdiff-key"


def _png_key(path: Path) -> str | None:
    if not path.is_file():
        return None
    with Image.open(path) as image:
        return image.text.get(_KEY_FIELD)


def case_preview(store: CaseStore, case_id: str, center_hu: float, width_hu: float, out: Path) -> Path:
    """Axial and coronal views of a case's thick and thin volumes, windowed, at true aspect.

    The coronal views show what the model is for: the thick series is blocky along z, the thin
    one is not. Written atomically (temp file + rename), with the case's store key and the
    window in the PNG's metadata; an existing preview made from the same is kept as it is.
    """
    key = settings_digest(store.case_key(case_id), center_hu, width_hu)
    if _png_key(out) == key:
        return out
    thick = store.read(case_id, "thick")
    thin = store.read(case_id, "thin")
    mid_z = len(thin.z_mm) // 2
    k_thick = int(np.argmin(np.abs(thick.z_mm - thin.z_mm[mid_z])))
    row = thin.shape[1] // 2
    dz_thin, dy, dx = thin.spacing_mm
    dz_thick = thick.spacing_mm[0]
    views = [
        ("thick, axial", thick.window(center_hu, width_hu)[k_thick], dy / dx),
        ("thin, axial", thin.window(center_hu, width_hu)[mid_z], dy / dx),
        ("thick, coronal", thick.window(center_hu, width_hu)[::-1, row, :], dz_thick / dx),
        ("thin, coronal", thin.window(center_hu, width_hu)[::-1, row, :], dz_thin / dx),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(14, 4), constrained_layout=True)
    for ax, (title, image, aspect) in zip(axes, views):
        ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, aspect=aspect, interpolation="nearest")
        ax.set_title(title)
        ax.axis("off")
    fig.suptitle(f"{case_id}: window {center_hu:g}/{width_hu:g} HU, thick {dz_thick:g} mm, thin {dz_thin:g} mm")
    try:
        with atomic_path(out) as tmp:
            fig.savefig(tmp, dpi=80, metadata={_KEY_FIELD: key})
    finally:
        plt.close(fig)
    return out
