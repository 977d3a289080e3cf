"""The input and output of inference: a thick CT in, a thin CT out, in the user's formats.

Input: a case ZIP or DICOM folder (its thickest axial CT series) or a .nii/.nii.gz volume.
Output: NIfTI for a .nii/.nii.gz path, otherwise a derived DICOM series in that folder. A
sampler that draws several samples also gets its uncertainty map beside it, in the same format:
X.nii.gz -> X_std.nii.gz, folder X/ -> folder X_std/ (`std_output_path`).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydicom.dataset import Dataset

from ctdiff.archive import ArchiveLimits
from ctdiff.dicom import read_series
from ctdiff.dicom_write import THIN_SERIES, SeriesLabel, check_series_target, write_dicom_series
from ctdiff.errors import CaseError
from ctdiff.nifti import is_nifti_path, read_nifti, write_nifti
from ctdiff.volume import Volume

OutputFormat = Literal["nifti", "dicom"]
# Single-file formats a user may mean but we do not write; taken as a folder name they would
# silently become a DICOM folder called "out.nrrd". A path the user names gets the stricter
# `check_output_name` (any suffix); this list also holds for a batch's folders named by case ids,
# which may contain dots.
_OTHER_FILE_SUFFIXES = (".gz", ".zip", ".nrrd", ".mha", ".mhd", ".dcm", ".npy", ".npz", ".h5", ".txt",
                        ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".json", ".csv")
_NIFTI_SUFFIXES = (".nii.gz", ".nii")  # longest first: "x.nii.gz" must not match as ".nii"
# Placed right after the thin series (offset 1000) in a viewer's list of the study's series.
STD_SERIES = SeriesLabel(
    "ctdiff thin uncertainty (std, HU)",
    "per-voxel standard deviation in HU of the samples the thin series averages",
    1001,
)


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


def check_input(path: str | Path, batch: bool = False) -> None:
    """Refuse, before a model is loaded, an input `read_thick` (or, with `batch`, a batch) could
    never read: a missing path, a folder named .nii/.nii.gz, a file of another kind."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"no such {'folder' if batch else 'file or folder'} {path}")
    if batch:
        if not path.is_dir():
            raise ValueError(f"{path} is not a folder of cases")
    elif (not path.is_file()) if is_nifti_path(path) else (path.is_file() and path.suffix.lower() != ".zip"):
        raise ValueError(f"{path}: give a case ZIP, a DICOM folder or a .nii/.nii.gz file")


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


def check_output_name(path: str | Path) -> None:
    """Refuse an output a user names with a file suffix we do not write ("out.txt", "out.png"):
    taken as a folder it would silently become a DICOM folder of that name. Accepted: X.nii,
    X.nii.gz, or a folder name without a suffix (or a folder that already exists)."""
    path = Path(path)
    if is_nifti_path(path) or not path.suffix or path.is_dir():
        return
    raise ValueError(
        f"cannot write {path.name!r}: give OUT.nii or OUT.nii.gz for NIfTI, or a folder name "
        "without a suffix for a DICOM series"
    )


def std_output_path(path: str | Path) -> Path:
    """Where the uncertainty map of the output at `path` goes: X.nii.gz -> X_std.nii.gz,
    X.nii -> X_std.nii, folder X -> folder X_std."""
    path = Path(path)
    name = path.name
    for suffix in _NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            cut = len(name) - len(suffix)
            return path.with_name(f"{name[:cut]}_std{name[cut:]}")
    return path.with_name(f"{name}_std")


def check_output(path: str | Path) -> OutputFormat:
    """`output_format(path)`, with the same refusals for its `_std` sibling, which a sampler of
    several samples writes too: both are checked before any work, not after hours of sampling."""
    fmt = output_format(path)
    std_path = std_output_path(path)
    try:
        output_format(std_path)
    except ValueError as exc:  # say which path: the user did not name this one
        raise ValueError(f"{std_path.name!r}, where the uncertainty map goes: {exc}") from exc
    return fmt


def remove_output(path: str | Path) -> None:
    """Remove an earlier output at `path`, if any: a NIfTI file, or a DICOM folder of ours (a
    foreign folder is refused as `output_format` does)."""
    path = Path(path)
    if output_format(path) == "nifti":
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path)


def write_output(volume: Volume, template: Dataset | None, path: str | Path,
                 label: SeriesLabel = THIN_SERIES) -> OutputFormat:
    """Write `volume` in the format `path` asks for (see `output_format`), atomically: a file
    or folder appears complete or not at all. `label` names a DICOM series (NIfTI has no use for it)."""
    fmt = output_format(path)
    if fmt == "nifti":
        write_nifti(volume, path)
    else:
        write_dicom_series(volume, template, path, label)
    return fmt
