"""A CT volume in Hounsfield units with the geometry needed to place it in patient space."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, Protocol

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

    def read_hu(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Slices [start, stop) of `hu`: a view (`out` is not needed)."""
        return self.hu[start:stop]

    def crop(self, start: int, stop: int) -> Volume:
        """Slices [start, stop), with the origin moved to the first of them."""
        return replace(
            self,
            hu=np.ascontiguousarray(self.hu[start:stop]),
            z_mm=self.z_mm[start:stop].copy(),
            origin_mm=shifted_origin(self.origin_mm, self.orientation, self.z_mm[start] - self.z_mm[0]),
        )


class SliceSource(Protocol):
    """A volume's geometry and its HU read in runs of slices: a `Volume`, or a DICOM series
    decoded as it is read (`ctdiff.dicom.SeriesReader`), which the store writes chunk by chunk
    without ever holding the whole (D, H, W) array."""

    @property
    def shape(self) -> tuple[int, int, int]: ...
    spacing_mm: tuple[float, float, float]
    z_mm: np.ndarray
    orientation: tuple[float, ...]
    origin_mm: tuple[float, float, float]

    def read_hu(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Slices [start, stop) as int16 (stop - start, H, W); `out` may receive them."""


def shifted_origin(origin_mm, orientation, distance_mm: float) -> tuple[float, float, float]:
    """`origin_mm` moved `distance_mm` along the slice normal of `orientation`."""
    normal = np.cross(orientation[:3], orientation[3:])
    return tuple(float(c) for c in np.asarray(origin_mm) + normal * distance_mm)  # type: ignore[return-value]
