"""Geometry helpers for the inference tests: volumes in odd orientations, and checks of where
every voxel lies, written from the Volume's definition rather than from ctdiff's own code.

A Volume's voxel (d, h, w) lies at origin + w·dx·row + h·dy·column + (z_d − z_0)·normal (LPS).
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from dicom_fixtures import ct_slice, write_folder
from pydicom.uid import generate_uid

from ctdiff.synth import SynthSpec, write_case
from ctdiff.volume import Volume


def rotation_matrix(z_deg: float, x_deg: float) -> np.ndarray:
    """The axial frame turned about z, then tilted about x; columns are row, column, normal."""
    a, b = np.radians(z_deg), np.radians(x_deg)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def rotation(z_deg: float, x_deg: float) -> tuple[float, ...]:
    r = rotation_matrix(z_deg, x_deg)
    return (*r[:, 0], *r[:, 1])


ORIENTATIONS = {
    "axial": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    "flipped": (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0),  # rows to the right: the normal points to the feet
    "oblique": rotation(20.0, 6.0),
}


def normal_of(orientation: tuple[float, ...]) -> np.ndarray:
    return np.cross(orientation[:3], orientation[3:])


def make_volume(orientation, rng, shape=(5, 12, 10), spacing=(2.0, 0.7, 0.8),
                origin=(-30.0, 12.5, 40.0), low=-1024, high=3000) -> Volume:
    """Random HU on a non-square grid; z_mm = position on the normal, as the DICOM reader gives."""
    z0 = float(np.dot(origin, normal_of(orientation)))
    return Volume(
        hu=rng.integers(low, high, size=shape).astype(np.int16),
        spacing_mm=spacing,
        z_mm=z0 + spacing[0] * np.arange(shape[0]),
        orientation=tuple(float(v) for v in orientation),
        origin_mm=origin,
    )


def world_lps(volume: Volume) -> np.ndarray:
    """(D, H, W, 3) LPS position of every voxel, from the Volume's definition."""
    row, col = np.array(volume.orientation[:3]), np.array(volume.orientation[3:])
    _, dy, dx = volume.spacing_mm
    d, h, w = np.meshgrid(*(np.arange(n) for n in volume.shape), indexing="ij")
    along = (volume.z_mm[d] - volume.z_mm[0])[..., None] * normal_of(volume.orientation)
    return np.asarray(volume.origin_mm) + w[..., None] * dx * row + h[..., None] * dy * col + along


def assert_same_image(volume: Volume, image: nib.Nifti1Image, atol_vox: float = 1e-3) -> None:
    """Every voxel of `volume` lands on a voxel of `image` with the same HU, and vice versa."""
    data = np.asarray(image.get_fdata())
    assert data.size == volume.hu.size
    ras = world_lps(volume) * np.array([-1.0, -1.0, 1.0])
    index = (ras - image.affine[:3, 3]) @ np.linalg.inv(image.affine[:3, :3]).T  # (D, H, W, 3)
    rounded = np.rint(index).astype(int)
    assert np.abs(index - rounded).max() < atol_vox
    assert np.all(rounded >= 0) and np.all(rounded < np.array(data.shape))
    np.testing.assert_array_equal(data[tuple(np.moveaxis(rounded, -1, 0))], volume.hu)


def dicom_template(study_uid: str) -> pydicom.Dataset:
    """The header of an input slice, as read_series hands it over (no pixel data)."""
    stored = np.zeros((4, 4), dtype=np.uint16)
    ds = pydicom.dcmread(BytesIO(ct_slice(stored, (0.0, 0.0, 0.0), series_uid=generate_uid(),
                                          study_uid=study_uid)))
    del ds.PixelData
    ds.FrameOfReferenceUID = generate_uid()
    ds.SeriesNumber = 3
    return ds


def write_dicom_input(folder: Path, volume: Volume, rng, nested: bool = True) -> Path:
    """The volume as an input DICOM series (uint16, intercept -1024): under random nested
    names, or (nested=False) as flat files, which a batch input folder needs to be one case."""
    study, series = generate_uid(), generate_uid()
    normal = normal_of(volume.orientation)
    files = [
        ct_slice((volume.hu[k].astype(np.int32) + 1024).astype(np.uint16),
                 tuple(np.asarray(volume.origin_mm) + normal * (volume.z_mm[k] - volume.z_mm[0])),
                 series_uid=series, study_uid=study, pixel_spacing_mm=volume.spacing_mm[1:],
                 orientation=volume.orientation, instance=k + 1)
        for k in range(volume.shape[0])
    ]
    if nested:
        return write_folder(folder, files, rng)
    folder.mkdir(parents=True)
    for k in rng.permutation(len(files)):
        (folder / f"slice{k:03d}").write_bytes(files[k])
    return folder


def assert_same_geometry(a: Volume, b: Volume, atol: float = 1e-4) -> None:
    assert a.shape == b.shape
    np.testing.assert_allclose(a.spacing_mm, b.spacing_mm, atol=atol)
    np.testing.assert_allclose(a.orientation, b.orientation, atol=atol)
    np.testing.assert_allclose(a.origin_mm, b.origin_mm, atol=atol)
    np.testing.assert_allclose(a.z_mm, b.z_mm, atol=atol)


def small_synth_case(out_dir: Path) -> Path:
    spec = SynthSpec(n_cases=1, size=16, n_thin=20, margin_slices=1, noise_hu=0.0)
    return write_case(out_dir, spec, 0)
