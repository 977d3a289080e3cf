"""Synthetic paired thick/thin chest CT cases, written as DICOM ZIPs in the input layout (SPEC 2).

Geometry of one case (r = thick_mm / thin_mm, an integer; m = margin_slices):
- The thin series has n_thin + 2m slices, thin index i = 0 at the head, ImagePositionPatient
  z_i = z_centre + ((n_thin + 2m - 1) / 2 - i) * thin_mm, so z descends head to feet.
- The thick series has n_thin / r slices; thick slice k is the mean of thin slices
  [m + k r, m + (k + 1) r) of the noiseless phantom (plus its own noise), and sits at their mean
  z. Its slab, z_k +- thick_mm / 2, is exactly the extent of those r thin slices.
- So the thin slices whose centres lie inside the thick series' slab extent are i in
  [m, m + n_thin); the m extra thin slices at each end lie outside it, and a reader must crop.
In-plane, pixel (row j, column i) sits at x = x0 + i * pixel_mm, y = y0 + j * pixel_mm with
x0 = y0 = -(size - 1) / 2 * pixel_mm, pixel_mm = fov_mm / size; the volume is centred.

Stored values: thin as int16 HU (PixelRepresentation 1, intercept 0) with -2048 padding
(PixelPaddingValue) outside the circular field of view; thick as uint16 HU + 1024
(PixelRepresentation 0, intercept -1024) with 0 (-1024 HU) outside it. Both are clipped to
[-1024, 3071] HU. Each ZIP also holds a coronal scout and a radiation dose SR, under random
hex member names in shuffled order, and fake patient data (PHI_MARKERS) for leak tests.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    XRayRadiationDoseSRStorage,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

from ctdiff.atomic import atomic_path
from ctdiff.phantom import chest_phantom

TRANSFER_SYNTAXES = {  # compression name -> transfer syntax; all are lossless
    "none": ExplicitVRLittleEndian,
    "deflate": DeflatedExplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg2000": JPEG2000Lossless,
}
# Substrings of the fake patient data in every synthetic file; none may appear in the store,
# logs, results or artifacts. Accession numbers are "ACC<NNN>": see `case_phi` for exact values.
PHI_MARKERS = (
    "SYNTH^PATIENT^",
    "SYNTHID",
    "19700101",
    "Synthetic General Hospital",
    "REFERRING^DOCTOR",
)
HU_MIN, HU_MAX = -1024, 3071  # the range a 12-bit CT reconstruction can hold
THIN_PADDING = -2048  # stored outside the field of view of the thin series
THICK_INTERCEPT = -1024
_ZIP_TIME = (2024, 1, 1, 0, 0, 0)  # fixed member times, so re-synthesising gives equal ZIPs


@dataclass
class SynthSpec:
    n_cases: int = 6
    size: int = 64  # in-plane pixels
    fov_mm: float = 350.0  # reconstruction diameter; pixel_mm = fov_mm / size
    n_thin: int = 60  # thin slices under the thick series (a multiple of thick/thin)
    thin_mm: float = 1.0
    thick_mm: float = 5.0
    categories: tuple[str, ...] = ("APE", "non-APE")  # assigned round-robin; "APE" gets emboli
    seed: int = 0
    noise_hu: float = 12.0  # thin-slice noise sigma; thick gets noise_hu / sqrt(ratio)
    compression: str = "none"  # one of TRANSFER_SYNTAXES
    margin_slices: int = 3  # extra thin slices beyond the thick extent at each end

    def __post_init__(self) -> None:
        self.categories = tuple(self.categories)
        if self.compression not in TRANSFER_SYNTAXES:
            raise ValueError(
                f"compression={self.compression!r}: use one of {', '.join(TRANSFER_SYNTAXES)}"
            )
        if self.n_cases < 0 or self.size < 8 or self.fov_mm <= 0 or self.margin_slices < 0:
            raise ValueError("need n_cases >= 0, size >= 8, fov_mm > 0 and margin_slices >= 0")
        if not self.categories or any(not c or "/" in c for c in self.categories):
            raise ValueError(f"categories={self.categories!r}: give non-empty folder names")
        if self.thin_mm <= 0 or self.thick_mm < self.thin_mm or self.noise_hu < 0:
            raise ValueError("need 0 < thin_mm <= thick_mm and noise_hu >= 0")
        ratio = self.thick_mm / self.thin_mm
        if abs(ratio - round(ratio)) > 1e-6:
            raise ValueError(f"thick_mm / thin_mm = {ratio:g}: make it a whole number")
        if self.compression == "jpeg2000" and self.size < 32:
            # pylibjpeg-openjpeg always uses 6 wavelet levels, which need 32 x 32 pixels.
            raise ValueError(f"size={self.size}: JPEG 2000 needs size >= 32")
        if self.n_thin < self.ratio or self.n_thin % self.ratio:
            raise ValueError(f"n_thin={self.n_thin}: make it a positive multiple of {self.ratio}")

    @property
    def ratio(self) -> int:
        return int(round(self.thick_mm / self.thin_mm))

    @property
    def pixel_mm(self) -> float:
        return self.fov_mm / self.size


@dataclass(frozen=True)
class CaseGeometry:
    """Where every slice of one case lies; see the module docstring for the rules."""

    thin_z_mm: np.ndarray  # (n_thin + 2 margin,) ImagePositionPatient z, head first, descending
    thick_z_mm: np.ndarray  # (n_thick,) head first, descending
    ratio: int  # thin slices per thick slab
    first_covered: int  # thin index of the first slice under thick slice 0 (= margin)
    pixel_mm: float
    origin_xy_mm: tuple[float, float]  # ImagePositionPatient x, y of every axial slice
    fov_radius_mm: float

    def slab(self, k: int) -> slice:
        """The thin indices that thick slice k averages."""
        start = self.first_covered + k * self.ratio
        return slice(start, start + self.ratio)

    @property
    def covered(self) -> slice:
        """The thin indices inside the thick series' slab extent."""
        return slice(self.first_covered, self.first_covered + len(self.thick_z_mm) * self.ratio)


def case_category(spec: SynthSpec, case_index: int) -> str:
    return spec.categories[case_index % len(spec.categories)]


def case_phi(case_index: int) -> dict[str, str]:
    """The fake patient-identifying values of one case, by DICOM keyword."""
    n = f"{case_index:03d}"
    return {
        "PatientName": f"SYNTH^PATIENT^{n}",
        "PatientID": f"SYNTHID{n}",
        "PatientBirthDate": "19700101",
        "AccessionNumber": f"ACC{n}",
        "InstitutionName": "Synthetic General Hospital",
        "ReferringPhysicianName": "REFERRING^DOCTOR",
    }


def case_geometry(spec: SynthSpec, case_index: int) -> CaseGeometry:
    r, m = spec.ratio, spec.margin_slices
    n_total = spec.n_thin + 2 * m
    # The table position of the centre varies per case so positions are not all alike.
    z_centre = -float(np.random.default_rng([spec.seed, case_index, 3]).integers(100, 300))
    thin_z = z_centre + ((n_total - 1) / 2 - np.arange(n_total)) * spec.thin_mm
    thick_z = thin_z[m : m + spec.n_thin].reshape(-1, r).mean(axis=1)
    origin = -(spec.size - 1) / 2 * spec.pixel_mm
    return CaseGeometry(thin_z, thick_z, r, m, spec.pixel_mm, (origin, origin), spec.fov_mm / 2)


def _outside_fov(spec: SynthSpec) -> np.ndarray:
    c = (np.arange(spec.size) - (spec.size - 1) / 2) * spec.pixel_mm
    return c[None, :] ** 2 + c[:, None] ** 2 > (spec.fov_mm / 2) ** 2  # (H, W)


def phantom_pair(spec: SynthSpec, case_index: int) -> tuple[np.ndarray, np.ndarray, CaseGeometry]:
    """(thin_hu, thick_hu, geometry): float32 (D, H, W), exactly the HU written to DICOM.

    Deterministic for (spec.seed, case_index); the anatomy does not depend on noise_hu.
    """
    geo = case_geometry(spec, case_index)
    r, m, n_thick = spec.ratio, spec.margin_slices, len(geo.thick_z_mm)
    thin = chest_phantom(
        len(geo.thin_z_mm), spec.size, spec.pixel_mm, spec.thin_mm,
        np.random.default_rng([spec.seed, case_index, 0]),
        emboli=case_category(spec, case_index) == "APE",
    )  # (D_thin, H, W)
    thick = thin[m : m + n_thick * r].reshape(n_thick, r, spec.size, spec.size).mean(axis=1)
    if spec.noise_hu > 0:
        noise_rng = np.random.default_rng([spec.seed, case_index, 1])
        noise = noise_rng.standard_normal(thin.shape, dtype=np.float32)
        noise *= np.float32(spec.noise_hu)
        thin += noise
        del noise
        thick_noise = noise_rng.standard_normal(thick.shape, dtype=np.float32)
        thick += thick_noise * np.float32(spec.noise_hu / np.sqrt(r))
    outside = _outside_fov(spec)
    for vol, fill in ((thin, THIN_PADDING), (thick, HU_MIN)):
        np.rint(vol, out=vol)
        np.clip(vol, HU_MIN, HU_MAX, out=vol)
        vol[:, outside] = fill
    return thin, thick, geo


def _ds(value: float) -> str:
    return format_number_as_ds(float(value))


def _uid(spec: SynthSpec, case_index: int, *parts: object) -> str:
    sources = ["ctdiff-synth", str(spec.seed), str(case_index), *map(str, parts)]
    return generate_uid(entropy_srcs=sources)


def _study(spec: SynthSpec, case_index: int) -> Dataset:
    """Elements every file of a case shares: patient, study and frame of reference."""
    ds = Dataset()
    for keyword, value in case_phi(case_index).items():
        setattr(ds, keyword, value)
    ds.PatientSex = "O"
    ds.StudyInstanceUID = _uid(spec, case_index, "study")
    ds.FrameOfReferenceUID = _uid(spec, case_index, "frame")
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.StudyID = "1"
    ds.StudyDescription = "CT CHEST PE PROTOCOL"
    ds.Manufacturer = "ctdiff synthetic phantom"
    ds.SpecificCharacterSet = "ISO_IR 100"
    return ds


def _image(study: Dataset, series: dict, instance: int, sop_uid: str, arr: np.ndarray) -> Dataset:
    """A CT image dataset (pixel data still to be attached) from study + series + slice values."""
    ds = Dataset()
    ds.update(study)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.Modality = "CT"
    for keyword, value in series.items():
        setattr(ds, keyword, value)
    ds.InstanceNumber = instance
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = int(arr.dtype == np.int16)
    return ds


def _encode(ds: Dataset, arr: np.ndarray | None, compression: str) -> bytes:
    """Attach pixel data in the chosen transfer syntax and write the file to bytes."""
    syntax = TRANSFER_SYNTAXES[compression]
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if arr is not None and syntax.is_compressed:
        ds.compress(syntax, arr, generate_instance_uid=False)
    else:
        if arr is not None:
            ds.PixelData = arr.tobytes()
        # The SR has no pixel data, so RLE / JPEG 2000 have nothing to compress: keep it plain.
        plain = syntax if not syntax.is_compressed else ExplicitVRLittleEndian
        ds.file_meta.TransferSyntaxUID = plain
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _dose_report(spec: SynthSpec, case_index: int, study: Dataset) -> Dataset:
    """A minimal X-Ray Radiation Dose SR: no pixel data, to be ignored by readers."""

    def code(value: str, scheme: str, meaning: str) -> Dataset:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
        return item

    dlp = Dataset()
    dlp.RelationshipType, dlp.ValueType = "CONTAINS", "NUM"
    dlp.ConceptNameCodeSequence = Sequence([code("113813", "DCM", "DLP Total")])
    measured = Dataset()
    measured.NumericValue = _ds(12.0 * spec.n_thin * spec.thin_mm)
    measured.MeasurementUnitsCodeSequence = Sequence([code("mGy.cm", "UCUM", "mGy.cm")])
    dlp.MeasuredValueSequence = Sequence([measured])
    ds = Dataset()
    ds.update(study)
    ds.SOPClassUID = XRayRadiationDoseSRStorage
    ds.SOPInstanceUID = _uid(spec, case_index, "sr", 0)
    ds.Modality = "SR"
    ds.SeriesInstanceUID = _uid(spec, case_index, "sr")
    ds.SeriesNumber, ds.InstanceNumber = 999, 1
    ds.SeriesDescription = "Dose Report"
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = Sequence([code("113701", "DCM", "X-Ray Radiation Dose Report")])
    ds.ContinuityOfContent, ds.CompletionFlag = "SEPARATE", "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.ContentSequence = Sequence([dlp])
    return ds


def _member_names(rng: np.random.Generator, n: int) -> list[str]:
    """Non-descriptive, unique `DICOM/<hex>/<hex>/<hex>` names over a few shared folders."""
    def hex_name(n_bytes: int) -> str:
        return rng.bytes(n_bytes).hex().upper()

    folders = [f"DICOM/{hex_name(4)}/{hex_name(4)}" for _ in range(3)]
    names: set[str] = set()
    out = []
    while len(out) < n:
        name = f"{folders[int(rng.integers(len(folders)))]}/{hex_name(6)}"
        if name not in names:
            names.add(name)
            out.append(name)
    return out


def write_case(out_dir: Path, spec: SynthSpec, case_index: int) -> Path:
    """Write `out_dir/<category>/case_<NNN>.zip` (atomically) and return its path."""
    thin, thick, geo = phantom_pair(spec, case_index)
    study = _study(spec, case_index)
    x0, y0 = geo.origin_xy_mm
    spacing = [_ds(spec.pixel_mm), _ds(spec.pixel_mm)]

    def axial(role: str, number: int, thickness: float, extra: dict) -> dict:
        return {
            "SeriesInstanceUID": _uid(spec, case_index, role),
            "SeriesNumber": number,
            "SeriesDescription": f"Chest {thickness:g} mm",
            "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
            "ImageOrientationPatient": [1, 0, 0, 0, 1, 0],
            "PixelSpacing": spacing,
            "SliceThickness": _ds(thickness),
            "WindowCenter": "40",
            "WindowWidth": "400",
            **extra,
        }

    thin_series = axial("thin", 3, spec.thin_mm, {"RescaleIntercept": "0", "RescaleSlope": "1"})
    thick_series = axial(
        "thick", 2, spec.thick_mm,
        {"RescaleIntercept": _ds(THICK_INTERCEPT), "RescaleSlope": "1"},
    )
    scout_row_mm = len(thin) * spec.thin_mm / spec.size
    scout_series = {
        "SeriesInstanceUID": _uid(spec, case_index, "scout"),
        "SeriesNumber": 1,
        "SeriesDescription": "Topogram",
        "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"],
        "ImageOrientationPatient": [1, 0, 0, 0, 0, -1],  # coronal: columns run to the feet
        "ImagePositionPatient": [_ds(x0), "0", _ds(geo.thin_z_mm[0])],
        # size x size pixels (JPEG 2000 needs >= 32 rows), rows spread over the thin extent
        "PixelSpacing": [_ds(scout_row_mm), _ds(spec.pixel_mm)],
        "RescaleIntercept": "0",
        "RescaleSlope": "1",
    }

    def thin_file(i: int) -> bytes:
        z = geo.thin_z_mm[i]
        arr = thin[i].astype(np.int16)
        ds = _image(study, thin_series, i + 1, _uid(spec, case_index, "thin", i), arr)
        ds.ImagePositionPatient = [_ds(x0), _ds(y0), _ds(z)]
        ds.SliceLocation = _ds(z)
        ds.add_new(0x00280120, "SS", THIN_PADDING)  # PixelPaddingValue
        return _encode(ds, arr, spec.compression)

    def thick_file(k: int) -> bytes:
        z = geo.thick_z_mm[k]
        arr = (thick[k] - THICK_INTERCEPT).astype(np.uint16)
        ds = _image(study, thick_series, k + 1, _uid(spec, case_index, "thick", k), arr)
        ds.ImagePositionPatient = [_ds(x0), _ds(y0), _ds(z)]
        ds.SliceLocation = _ds(z)
        return _encode(ds, arr, spec.compression)

    def scout_file(_: int) -> bytes:
        rows = (np.arange(spec.size) * len(thin)) // spec.size  # nearest thin slice per row
        projection = np.maximum(thin, HU_MIN).mean(axis=1)  # (D_thin, W), padding as air
        arr = np.rint(projection[rows]).astype(np.int16)  # (size, W)
        ds = _image(study, scout_series, 1, _uid(spec, case_index, "scout", 0), arr)
        return _encode(ds, arr, spec.compression)

    def dose_file(_: int) -> bytes:
        return _encode(_dose_report(spec, case_index, study), None, spec.compression)

    jobs = [(thin_file, i) for i in range(len(thin))]
    jobs += [(thick_file, k) for k in range(len(thick))] + [(scout_file, 0), (dose_file, 0)]
    file_rng = np.random.default_rng([spec.seed, case_index, 2])
    names = _member_names(file_rng, len(jobs))
    order = file_rng.permutation(len(jobs))

    path = Path(out_dir) / case_category(spec, case_index) / f"case_{case_index:03d}.zip"
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for j in order:
            make, index = jobs[j]
            info = zipfile.ZipInfo(names[j], date_time=_ZIP_TIME)
            zf.writestr(info, make(index), compress_type=zipfile.ZIP_DEFLATED, compresslevel=1)
    return path


def synthesize(out_dir: Path, spec: SynthSpec) -> list[Path]:
    """Write spec.n_cases paired cases under out_dir/<category>/; returns the ZIP paths."""
    return [write_case(Path(out_dir), spec, i) for i in range(spec.n_cases)]

