"""NIfTI in and out for `Volume`: DICOM patient coordinates (LPS) <-> NIfTI world (RAS).

A Volume's voxel (d, h, w) lies at origin + w·dx·row + h·dy·column + (z_d − z_0)·normal in LPS
(row/column = ImageOrientationPatient cosines, normal = row × column). NIfTI's array is (i, j, k)
with world RAS = affine · (i, j, k, 1), so we store the array as (W, H, D) and flip the x and y
rows of the LPS affine. Reading goes the other way for any orthogonal affine: the array axis
closest to patient z becomes the slice axis, and axes are flipped so that the volume reads like
a plain axial DICOM series (rows to the patient's left, columns to the back, slices ascending).
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from ctdiff.atomic import atomic_path
from ctdiff.dicom import AIR_HU, MAX_TILT_DEG
from ctdiff.errors import CaseError
from ctdiff.volume import Volume

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # its own inverse
ORTHOGONAL_TOL = 1e-3  # |cos| between two axes of an affine we accept as orthogonal
EVEN_SPACING_TOL = 0.01  # slice steps may differ from the spacing by this fraction
_INT16 = np.iinfo(np.int16)


def is_nifti_path(path: str | Path) -> bool:
    return str(path).lower().endswith((".nii", ".nii.gz"))


def directions(orientation: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit row, column and normal vectors (LPS) of an ImageOrientationPatient."""
    row = np.asarray(orientation[:3], dtype=np.float64)
    col = np.asarray(orientation[3:], dtype=np.float64)
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    normal = np.cross(row, col)
    return row, col, normal / np.linalg.norm(normal)


def lps_affine(volume: Volume) -> np.ndarray:
    """4×4 map from voxel index (w, h, d, 1) to LPS mm, slices `spacing_mm[0]` apart."""
    row, col, normal = directions(volume.orientation)
    dz, dy, dx = volume.spacing_mm
    affine = np.eye(4)
    affine[:3, 0] = row * dx
    affine[:3, 1] = col * dy
    affine[:3, 2] = normal * dz
    affine[:3, 3] = volume.origin_mm
    return affine


def ras_affine(volume: Volume) -> np.ndarray:
    """The NIfTI affine of `volume` stored as (W, H, D)."""
    return LPS_TO_RAS @ lps_affine(volume)


def write_nifti(volume: Volume, path: str | Path) -> Path:
    """Write int16 HU with qform and sform (scanner coordinates) set, units mm; atomically."""
    path = Path(path)
    if not is_nifti_path(path):
        raise ValueError("a NIfTI output path must end with .nii or .nii.gz")
    steps = np.diff(volume.z_mm)
    dz = volume.spacing_mm[0]
    if steps.size and np.max(np.abs(steps - dz)) > EVEN_SPACING_TOL * dz:
        raise ValueError("slices are not evenly spaced; NIfTI cannot place them")
    affine = ras_affine(volume)
    data = np.ascontiguousarray(volume.hu.transpose(2, 1, 0))  # (W, H, D) = NIfTI (i, j, k)
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code="scanner")
    image.set_sform(affine, code="scanner")
    image.header.set_xyzt_units("mm", "sec")
    # int16 in, int16 out: nibabel writes no scaling (scl_slope NaN, which readers take as 1).
    with atomic_path(path) as tmp:  # keeps the suffix: nibabel picks gzip from the name
        nib.save(image, tmp)
    return path


def read_nifti(path: str | Path) -> Volume:
    """A 3D NIfTI as an axial int16 HU Volume (rounded; values below air clipped to air, as
    the DICOM reader does). Raises `CaseError` for a corrupt, non-3D, sheared or non-axial file.
    """
    data, affine = _load(Path(path))
    lps = LPS_TO_RAS @ affine
    matrix, translation = lps[:3, :3], lps[:3, 3]
    zooms = np.linalg.norm(matrix, axis=0)  # mm per step along array axes 0, 1, 2
    if np.any(zooms <= 0) or not np.all(np.isfinite(lps)):
        raise CaseError("NIfTI affine is degenerate")
    axes = matrix / zooms  # (3, 3): column a = unit LPS direction of array axis a
    if np.max(np.abs(axes.T @ axes - np.eye(3))) > ORTHOGONAL_TOL:
        raise CaseError("NIfTI affine is sheared (e.g. gantry tilt); resample it first")

    # Slice axis: the array axis closest to patient z; in-plane, the one closer to x runs along
    # rows (W), the other along columns (H).
    slice_axis = int(np.argmax(np.abs(axes[2])))
    tilt_deg = np.degrees(np.arccos(min(1.0, abs(axes[2, slice_axis]))))
    if tilt_deg > MAX_TILT_DEG:
        raise CaseError(f"NIfTI volume is not axial (slices {tilt_deg:.0f} deg off patient z)")
    a, b = (ax for ax in range(3) if ax != slice_axis)
    w_axis, h_axis = (a, b) if abs(axes[0, a]) >= abs(axes[0, b]) else (b, a)
    flip = {w_axis: axes[0, w_axis] < 0, h_axis: axes[1, h_axis] < 0}
    row = axes[:, w_axis] * (-1 if flip[w_axis] else 1)
    col = axes[:, h_axis] * (-1 if flip[h_axis] else 1)
    normal = np.cross(row, col)
    flip[slice_axis] = float(np.dot(axes[:, slice_axis], normal)) < 0

    # The voxel that becomes (0, 0, 0): index n-1 along every flipped axis.
    first = np.array([data.shape[ax] - 1 if flip[ax] else 0 for ax in range(3)], dtype=np.float64)
    origin = matrix @ first + translation
    hu = data
    for ax in range(3):
        if flip[ax]:
            hu = np.flip(hu, axis=ax)
    hu = np.ascontiguousarray(hu.transpose(slice_axis, h_axis, w_axis))  # (D, H, W)
    dz = float(zooms[slice_axis])
    z_mm = float(np.dot(origin, normal)) + dz * np.arange(hu.shape[0])
    return Volume(
        hu=hu,
        spacing_mm=(dz, float(zooms[h_axis]), float(zooms[w_axis])),
        z_mm=z_mm,
        orientation=tuple(float(v) for v in (*row, *col)),
        origin_mm=tuple(float(v) for v in origin),  # type: ignore[arg-type]
    )


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(int16 HU array, RAS affine) of a 3D image; trailing singleton dimensions are dropped."""
    try:
        image = nib.load(path)
        data = np.asanyarray(image.dataobj)  # applies scl_slope / scl_inter
    # What nibabel raises on a damaged header, a truncated gzip stream or short data.
    except (ImageFileError, EOFError, gzip.BadGzipFile, zlib.error, ValueError) as exc:
        raise CaseError(f"corrupt NIfTI ({type(exc).__name__})") from exc
    except OSError as exc:
        # nibabel reports short data as an OSError without errno (and with the path in it);
        # one with an errno is the storage failing (EIO, ESTALE), not the file: let it through.
        if exc.errno is not None:
            raise
        raise CaseError("corrupt NIfTI (data shorter than its header says)") from exc
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise CaseError(f"NIfTI must hold one 3D volume, got shape {tuple(data.shape)}")
    if not np.issubdtype(data.dtype, np.number) or np.issubdtype(data.dtype, np.complexfloating):
        raise CaseError(f"NIfTI data type {data.dtype} is not a CT intensity")
    # float32 holds every integer of the int16 range exactly; larger values are clipped anyway.
    data = data.astype(np.float32, copy=False)
    if not np.all(np.isfinite(data)):
        raise CaseError("NIfTI holds NaN or infinite values")
    hu = np.clip(np.rint(data), AIR_HU, _INT16.max).astype(np.int16)
    return hu, np.asarray(image.affine, dtype=np.float64)
