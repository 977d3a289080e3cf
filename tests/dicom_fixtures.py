"""Small synthetic CT cases for tests, written with pydicom.

Slices carry fake PHI so tests can check it never reaches an error reason; ZIP member names are
random, nested and shuffled so tests can check that nothing relies on them.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    XRayRadiationDoseSRStorage,
    generate_uid,
)

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
FAKE_PATIENT = "DOE^JANE"


def _base(modality: str, sop_class: str, study_uid: str, series_uid: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientName = FAKE_PATIENT
    ds.PatientID = "PID-0042"
    ds.PatientBirthDate = "19700101"
    ds.AccessionNumber = "ACC-7"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    return ds


def to_bytes(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
    """Encode a dataset as a DICOM file in the given transfer syntax."""
    if syntax != ds.file_meta.TransferSyntaxUID and pydicom.uid.UID(syntax).is_compressed:
        ds.compress(syntax)  # RLE: pydicom's encoder; JPEG 2000: pylibjpeg-openjpeg
    else:
        ds.file_meta.TransferSyntaxUID = syntax  # deflate happens when writing
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def ct_slice(
    stored: np.ndarray,
    position_mm: tuple[float, float, float],
    *,
    series_uid: str,
    study_uid: str,
    pixel_spacing_mm: tuple[float, float] = (0.7, 0.8),
    orientation: tuple[float, ...] = AXIAL,
    slope: float = 1.0,
    intercept: float = -1024.0,
    bits_stored: int = 16,
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    syntax: str = ExplicitVRLittleEndian,
    instance: int = 1,
) -> bytes:
    """One CT image; `stored` (H, W) is int16 (signed pixels) or uint16 (unsigned)."""
    ds = _base("CT", CTImageStorage, study_uid, series_uid)
    ds.ImageType = list(image_type)
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [f"{v:.4f}" for v in position_mm]
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
    ds.PixelSpacing = [f"{v:.4f}" for v in pixel_spacing_mm]
    ds.SliceThickness = "9.9"  # deliberately wrong: spacing must come from positions
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleIntercept = f"{intercept:g}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if stored.dtype == np.int16 else 0
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    return to_bytes(ds, syntax)


def ct_series(
    stored: np.ndarray,
    z_mm: list[float] | np.ndarray,
    *,
    study_uid: str,
    origin_xy_mm: tuple[float, float] = (-100.0, -120.0),
    **kwargs,
) -> list[bytes]:
    """An axial series, one file per slice of `stored` (D, H, W) at the given z positions."""
    series_uid = generate_uid()
    return [
        ct_slice(stored[k], (*origin_xy_mm, float(z)), series_uid=series_uid,
                 study_uid=study_uid, instance=k + 1, **kwargs)
        for k, z in enumerate(z_mm)
    ]


def localizer(study_uid: str, shape: tuple[int, int] = (16, 20)) -> bytes:
    """A coronal scout: CT with pixels, ImageType LOCALIZER."""
    stored = np.full(shape, 1000, dtype=np.uint16)
    return ct_slice(stored, (-100.0, 0.0, 50.0), series_uid=generate_uid(), study_uid=study_uid,
                    orientation=CORONAL, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))


def dose_report(study_uid: str) -> bytes:
    """A radiation dose structured report: DICOM, no pixel data."""
    ds = _base("SR", XRayRadiationDoseSRStorage, study_uid, generate_uid())
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    return to_bytes(ds)


def stored_volume(rng: np.random.Generator, shape: tuple[int, int, int], signed: bool
                  ) -> np.ndarray:
    """Random stored values spanning air to bone; (D, H, W) int16 or uint16."""
    if signed:
        return rng.integers(-1024, 3072, size=shape).astype(np.int16)
    return rng.integers(0, 4096, size=shape).astype(np.uint16)


def random_name(rng: np.random.Generator, depth: int | None = None) -> str:
    """A nested member name that says nothing about series or order (and holds fake PHI)."""
    depth = int(rng.integers(0, 3)) if depth is None else depth
    parts = [f"{FAKE_PATIENT}_{rng.integers(1e9):09d}" for _ in range(depth)]
    suffix = str(rng.choice(["", ".dcm", ".DCM", ".ima"]))
    return "/".join([*parts, f"{rng.integers(1e12):012x}{suffix}"])


def write_zip(path: Path, members: list[bytes], rng: np.random.Generator,
              extra: dict[str, bytes] | None = None, stored: bool = False) -> Path:
    """ZIP the members under random nested names, shuffled, plus `extra` named members."""
    named = [(random_name(rng), data) for data in members] + list((extra or {}).items())
    order = rng.permutation(len(named))
    method = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(path, "w", compression=method) as zf:
        for i in order:
            zf.writestr(named[i][0], named[i][1])
    return path


def write_folder(root: Path, members: list[bytes], rng: np.random.Generator,
                 extra: dict[str, bytes] | None = None) -> Path:
    """The same layout as `write_zip`, unzipped."""
    named = [(random_name(rng), data) for data in members] + list((extra or {}).items())
    for name, data in named:
        file = root / name
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(data)
    return root
