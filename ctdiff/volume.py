"""A CT volume in Hounsfield units with the geometry needed to place it in patient space."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from ctdiff.windowing import apply_window

Kind = Literal["thick", "thin"]  # the two series of a paired case
KINDS: tuple[Kind, Kind] = ("thick", "thin")

# ImageOrientationPatient of a plain axial slice: rows along +x, columns along +y.
AXIAL_ORIENTATION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


@dataclass(frozen=True)
class Volume:
    """Slices stacked along the slice normal, lowest position first.

    `z_mm` are slice positions projected on the normal (the cross product of the row and column
    direction cosines), so they ascend for any orientation. `origin_mm` is the
    ImagePositionPatient of the first slice; with `orientation` and `spacing_mm` it fixes the
    affine needed to write the volume back as NIfTI or DICOM.
    """

    hu: np.ndarray  # (D, H, W) int16
    spacing_mm: tuple[float, float, float]  # (dz, dy, dx)
    z_mm: np.ndarray  # (D,) float64, ascending
    orientation: tuple[float, ...] = AXIAL_ORIENTATION  # row cosines then column cosines
    origin_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def __post_init__(self) -> None:
        assert self.hu.ndim == 3, f"hu must be (D, H, W), got {self.hu.shape}"
        assert self.hu.dtype == np.int16, f"hu must be int16, got {self.hu.dtype}"
        assert len(self.z_mm) == self.hu.shape[0], "one position per slice"

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)  # type: ignore[return-value]

    def window(self, center_hu: float, width_hu: float) -> np.ndarray:
        """Model input: HU clipped to the window and scaled to [0, 1], float32 (D, H, W)."""
        return apply_window(self.hu, center_hu, width_hu)
