"""Write a Volume as a derived CT series that goes back into the study it came from.

The series gets new Series and SOP Instance UIDs; patient, study and frame-of-reference values
are copied from the input series' header (the template), so PACS files it under the same study
and patient coordinates. Without a template (NIfTI input) a fresh anonymous study is made.
Files are CT Image Storage, explicit VR little endian, uncompressed, written into a temporary
folder and moved into place.
"""

from __future__ import annotations

import re
import shutil
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from ctdiff.atomic import replace_dir
from ctdiff.dicom import AIR_HU
from ctdiff.nifti import directions
from ctdiff.volume import Volume

# Values that stay true for the derived series. Patient, Patient Study and General Study
# modules; the frame of reference (the positions we write are in the input's patient
# coordinates); and display/acquisition context that does not depend on slice spacing.
TEMPLATE_KEYWORDS = (
    "SpecificCharacterSet",
    "PatientName", "PatientID", "IssuerOfPatientID", "OtherPatientIDsSequence",
    "PatientBirthDate", "PatientSex", "PatientAge", "PatientSize", "PatientWeight",
    "PatientComments",
    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
    "IssuerOfAccessionNumberSequence", "ReferringPhysicianName", "StudyDescription",
    "PhysiciansOfRecord", "ProcedureCodeSequence", "RequestAttributesSequence",
    "FrameOfReferenceUID", "PositionReferenceIndicator",
    "PatientPosition", "BodyPartExamined", "KVP", "WindowCenter", "WindowWidth",
)
ANONYMOUS_PATIENT = {"PatientName": "ANONYMOUS", "PatientID": "ANONYMOUS"}
# Type 2 elements of the modules above: present in every valid file, empty when unknown.
TYPE2_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID", "AccessionNumber",
    "ReferringPhysicianName", "PositionReferenceIndicator", "PatientPosition", "KVP",
)
FILE_NAME = re.compile(r"^IM\d{5,}\.dcm$")


@dataclass(frozen=True)
class SeriesLabel:
    """How a derived series presents itself in a viewer's list of the study's series."""

    description: str  # SeriesDescription, 64 characters at most
    derivation: str  # DerivationDescription: what the pixels are
    number_offset: int  # SeriesNumber = the input series' number + this, so it sorts beside it


THIN_SERIES = SeriesLabel("ctdiff thin", "thin slices synthesized from a thicker series", 1000)


def file_name(instance: int) -> str:
    return f"IM{instance:05d}.dcm"


def check_series_target(out_dir: str | Path) -> None:
    """Refuse an output folder we must not replace: a file, or a folder with other content.

    A folder holding only IM#####.dcm files is an earlier output of ours and is replaced.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError("the DICOM output path is a file; give a folder (or a .nii.gz path)")
    if out_dir.is_dir() and any(not FILE_NAME.match(p.name) for p in out_dir.iterdir()):
        raise ValueError("the DICOM output folder holds other files; give a new or empty folder")


def shared_template(template: Dataset | None) -> Dataset:
    """`template` (None: a fresh anonymous study) with its study, frame of reference and study
    date fixed, for several series that must stay together (an output and its uncertainty map):
    `write_dicom_series` would give each series written from an incomplete template its own new
    study or frame of reference, and a viewer would neither list them together nor link them.
    """
    ds = Dataset()
    if template is None:
        for keyword, value in ANONYMOUS_PATIENT.items():
            setattr(ds, keyword, value)
    else:
        ds.update(template)  # a copy: the caller's header stays as it was
    if not ds.get("StudyInstanceUID"):
        ds.StudyInstanceUID = generate_uid()
    if not ds.get("FrameOfReferenceUID"):
        ds.FrameOfReferenceUID = generate_uid()
    now = datetime.now()
    if "StudyDate" not in ds:
        ds.StudyDate = now.strftime("%Y%m%d")
    if "StudyTime" not in ds:
        ds.StudyTime = now.strftime("%H%M%S")
    return ds


def write_dicom_series(
    volume: Volume,
    template: Dataset | None,
    out_dir: str | Path,
    label: SeriesLabel = THIN_SERIES,
    uid_root: str | None = None,
) -> list[Path]:
    """Write one file per slice, IM00001.dcm (lowest position) onward; returns their paths.

    `uid_root` ("1.2.3.") prefixes the new UIDs; None uses pydicom's root.
    """
    out_dir = Path(out_dir)
    check_series_target(out_dir)
    new_uid = (lambda: generate_uid()) if uid_root is None else (lambda: generate_uid(prefix=uid_root))
    base = _series_dataset(volume, template, label, new_uid())
    # One intercept for the whole series, so that uint16 stored values hold every int16 HU:
    # the usual -1024, lower only when the volume holds values below air.
    intercept = min(AIR_HU, int(volume.hu.min())) if volume.hu.size else AIR_HU
    base.RescaleIntercept = str(intercept)
    _, _, normal = directions(volume.orientation)
    origin = np.asarray(volume.origin_mm, dtype=np.float64)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        names = []
        for k in range(volume.shape[0]):
            position = origin + normal * (volume.z_mm[k] - volume.z_mm[0])
            stored = (volume.hu[k].astype(np.int32) - intercept).astype(np.uint16)  # (H, W)
            ds = _slice_dataset(base, k + 1, position, float(volume.z_mm[k]), stored, new_uid())
            names.append(file_name(k + 1))
            ds.save_as(tmp / names[-1], enforce_file_format=True)
        replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():  # only when writing failed
            shutil.rmtree(tmp)
    return [out_dir / name for name in names]


def _series_dataset(volume: Volume, template: Dataset | None, label: SeriesLabel,
                    series_uid: str) -> Dataset:
    """Everything shared by the slices of the series."""
    ds = Dataset()
    if template is None:
        for keyword, value in ANONYMOUS_PATIENT.items():
            setattr(ds, keyword, value)
    else:
        for keyword in TEMPLATE_KEYWORDS:
            if keyword in template:
                ds[keyword] = template[keyword]
    for keyword in TYPE2_KEYWORDS:
        if keyword not in ds:
            setattr(ds, keyword, "")
    if not ds.get("StudyInstanceUID"):
        ds.StudyInstanceUID = generate_uid()  # NIfTI input: a new study
    if not ds.get("FrameOfReferenceUID"):
        ds.FrameOfReferenceUID = generate_uid()  # type 1 in the Frame of Reference module
    now = datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.StudyDate = ds.get("StudyDate", date)
    ds.StudyTime = ds.get("StudyTime", time)
    ds.SeriesDate = ds.ContentDate = ds.InstanceCreationDate = date
    ds.SeriesTime = ds.ContentTime = ds.InstanceCreationTime = time
    ds.SOPClassUID = CTImageStorage
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    # Beside the input series in a viewer's list, without clashing with the scanner's numbers.
    source_number = int(template.get("SeriesNumber") or 0) if template is not None else 0
    ds.SeriesNumber = source_number + label.number_offset
    ds.SeriesDescription = label.description[:64]
    ds.Manufacturer = "ctdiff"
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.DerivationDescription = label.derivation
    ds.BurnedInAnnotation = "NO"
    ds.AcquisitionNumber = ""
    ds.ImageOrientationPatient = [format_number_as_ds(float(v)) for v in volume.orientation]
    dz, dy, dx = volume.spacing_mm
    ds.PixelSpacing = [format_number_as_ds(float(dy)), format_number_as_ds(float(dx))]
    ds.SliceThickness = ds.SpacingBetweenSlices = format_number_as_ds(float(dz))
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = volume.shape[1:]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 0  # unsigned; see the intercept in write_dicom_series
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    return ds


def _slice_dataset(base: Dataset, instance: int, position: np.ndarray, z_mm: float,
                   stored: np.ndarray, sop_uid: str) -> Dataset:
    ds = Dataset()
    ds.update(base)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [format_number_as_ds(float(v)) for v in position]
    ds.SliceLocation = format_number_as_ds(z_mm)
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    return ds
