"""CT intensity windowing: Hounsfield units to model input in [0, 1]."""

from __future__ import annotations

import numpy as np


def apply_window(hu: np.ndarray, center_hu: float, width_hu: float) -> np.ndarray:
    """Clip HU to [center - width/2, center + width/2] and scale linearly to [0, 1] (float32)."""
    if width_hu <= 0:
        raise ValueError(f"window width must be positive, got {width_hu} HU")
    lower_hu = center_hu - width_hu / 2.0
    out = (hu.astype(np.float32) - np.float32(lower_hu)) / np.float32(width_hu)
    return np.clip(out, 0.0, 1.0, out=out)


def invert_window(x: np.ndarray, center_hu: float, width_hu: float) -> np.ndarray:
    """HU (float32) from windowed values in [0, 1]; exact inside the window only."""
    lower_hu = center_hu - width_hu / 2.0
    return x.astype(np.float32) * np.float32(width_hu) + np.float32(lower_hu)
