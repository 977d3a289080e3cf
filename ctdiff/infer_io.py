"""The input and output of inference: a thick CT in, a thin CT out, in the user's formats.

Input: a case ZIP or DICOM folder (its thickest axial CT series) or a .nii/.nii.gz volume.
Output: NIfTI for a .nii/.nii.gz path, otherwise a derived DICOM series in that folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydicom.dataset import Dataset

from ctdiff.archive import ArchiveLimits
from ctdiff.dicom import read_series
from ctdiff.dicom_write import check_series_target, write_dicom_series
from ctdiff.errors import CaseError
from ctdiff.nifti import is_nifti_path, read_nifti, write_nifti
from ctdiff.volume import Volume

OutputFormat = Literal["nifti", "dicom"]
# Single-file formats a user may mean but we do not write; taken as a folder name they would
# silently become a DICOM folder called "out.nrrd".
_OTHER_FILE_SUFFIXES = (".gz", ".zip", ".nrrd", ".mha", ".mhd", ".dcm", ".npy", ".npz", ".h5")


@dataclass(frozen=True)
class ThickInput:
    volume: Volume
    template: Dataset | None  # first slice's header (DICOM input), to derive the output series
    source: Literal["dicom", "nifti"]


def read_thick(path: str | Path, limits: ArchiveLimits = ArchiveLimits()) -> ThickInput:
    """Read the thick volume to infer from. Raises `CaseError` with a reason free of paths."""
    path = Path(path)
    if not path.exists():
        raise CaseError("input not found")
    if is_nifti_path(path):
        if not path.is_file():
            raise CaseError("a .nii/.nii.gz input must be a file")
        return ThickInput(read_nifti(path), None, "nifti")
    if path.is_file() and path.suffix.lower() != ".zip":
        raise CaseError("unsupported input: give a case ZIP, a DICOM folder or a .nii/.nii.gz file")
    series = read_series(path, "thickest", limits)
    return ThickInput(series.volume, series.header, "dicom")


def output_format(path: str | Path) -> OutputFormat:
    """NIfTI for .nii/.nii.gz, else DICOM into a folder; an unwritable choice is a ValueError."""
    if is_nifti_path(path):
        return "nifti"
    if str(path).lower().endswith(_OTHER_FILE_SUFFIXES):
        raise ValueError(
            f"cannot write {Path(path).name!r}: give a .nii/.nii.gz path for NIfTI, or a folder "
            "for a DICOM series"
        )
    check_series_target(path)
    return "dicom"


def write_output(volume: Volume, template: Dataset | None, path: str | Path) -> OutputFormat:
    """Write `volume` in the format `path` asks for (see `output_format`)."""
    fmt = output_format(path)
    if fmt == "nifti":
        write_nifti(volume, path)
    else:
        write_dicom_series(volume, template, path)
    return fmt
