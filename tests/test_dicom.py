"""ctdiff.archive and ctdiff.dicom: cases in, thick/thin HU volumes out, or a clear reason."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tracemalloc
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_fixtures import (
    CORONAL,
    FAKE_PATIENT,
    ct_series,
    ct_slice,
    dose_report,
    localizer,
    stored_volume,
    write_folder,
    write_zip,
)
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import apply_modality_lut
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    MPEG2MPML,
    RLELossless,
    generate_uid,
)

from ctdiff.archive import ArchiveLimits, iter_members
from ctdiff.dicom import CasePair, open_case, read_case
from ctdiff.errors import CaseError

SHAPE = (32, 40)  # (H, W): not square, to catch swapped axes; J2K needs >= 32 per side
THICK_Z = np.arange(-20.0, 0.1, 5.0)  # 5 slices, 5 mm
THIN_Z = np.arange(-21.0, 1.1, 1.0)  # 23 slices, 1 mm, covering the thick range


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240611)


@dataclass
class Case:
    thick: list[bytes]  # one file per slice, in THICK_Z order
    thin: list[bytes]
    others: list[bytes]  # scout, dose report, a coronal reformat
    thick_hu: np.ndarray  # (D, H, W) expected HU
    thin_hu: np.ndarray

    @property
    def members(self) -> list[bytes]:
        return self.thick + self.thin + self.others


def make_case(rng, *, syntax=ExplicitVRLittleEndian, signed=False, slope=1.0,
              intercept=-1024.0, bits_stored=16, thin_kwargs=None) -> Case:
    study = generate_uid()
    kw = dict(study_uid=study, syntax=syntax, slope=slope, intercept=intercept,
              bits_stored=bits_stored)
    thick = stored_volume(rng, (len(THICK_Z), *SHAPE), signed)
    thin = stored_volume(rng, (len(THIN_Z), *SHAPE), signed)
    coronal = stored_volume(rng, (3, *SHAPE), signed)
    others = [localizer(study, SHAPE), dose_report(study)]
    others += ct_series(coronal, [0.0, 2.0, 4.0], orientation=CORONAL, **kw)
    return Case(
        thick=ct_series(thick, THICK_Z, **kw),
        thin=ct_series(thin, THIN_Z, **{**kw, **(thin_kwargs or {})}),
        others=others,
        thick_hu=to_air(thick.astype(np.int64) * int(slope) + int(intercept)),
        thin_hu=to_air(thin.astype(np.int64) * int(slope) + int(intercept)),
    )


def to_air(hu: np.ndarray) -> np.ndarray:
    """The reader's rule: values below air (-1024 HU) are padding outside the FOV."""
    return np.maximum(hu, -1024)


def reference_volume(members: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Independent reading: pydicom's modality LUT on the files sorted by IPP z."""
    datasets = sorted((pydicom.dcmread(io.BytesIO(m)) for m in members),
                      key=lambda ds: float(ds.ImagePositionPatient[2]))
    hu = to_air(np.stack([np.rint(apply_modality_lut(ds.pixel_array, ds)) for ds in datasets]))
    z = np.array([float(ds.ImagePositionPatient[2]) for ds in datasets])
    return z, hu


def reason(path: Path, limits: ArchiveLimits = ArchiveLimits()) -> str:
    with pytest.raises(CaseError) as info:
        read_case(path, limits)
    text = info.value.reason
    assert FAKE_PATIENT.split("^")[0] not in text and "PID" not in text, text
    return text


# ---------------------------------------------------------------------- pair selection, values


def test_pair_chosen_by_content_not_names_or_order(tmp_path, rng):
    case = make_case(rng)
    extra = {"README.txt": b"not dicom", "DOE^JANE/DICOMDIR": b"\0" * 300}
    first = read_case(write_zip(tmp_path / "a.zip", case.members, rng, extra), ArchiveLimits())
    second = read_case(write_zip(tmp_path / "b.zip", case.members[::-1], rng, extra))

    for pair in (first, second):
        assert isinstance(pair, CasePair)
        assert pair.thick.hu.dtype == np.int16 and pair.thick.shape == (5, 32, 40)
        assert pair.thin.shape == (23, 32, 40)
        np.testing.assert_array_equal(pair.thick.hu, case.thick_hu)
        np.testing.assert_array_equal(pair.thin.hu, case.thin_hu)
        np.testing.assert_allclose(pair.thick.z_mm, THICK_Z)
        np.testing.assert_allclose(pair.thin.z_mm, THIN_Z)
        # dz from positions (SliceThickness says 9.9), then PixelSpacing (row, column)
        assert pair.thick.spacing_mm == pytest.approx((5.0, 0.7, 0.8))
        assert pair.thin.spacing_mm == pytest.approx((1.0, 0.7, 0.8))
        assert pair.thick.orientation == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
        assert pair.thick.origin_mm == pytest.approx((-100.0, -120.0, -20.0))
        assert pair.thin.origin_mm == pytest.approx((-100.0, -120.0, -21.0))
        # 5 + 23 slices, scout, SR, 3 coronal, README, DICOMDIR
        assert (pair.n_files, pair.n_ignored) == (35, 7)


def test_thin_is_the_finest_overlapping_series_with_most_slices(tmp_path, rng):
    case = make_case(rng)  # thick 5 mm; thin 1 mm, 23 slices
    study = generate_uid()
    partial = ct_series(stored_volume(rng, (5, *SHAPE), False), np.arange(-3.0, 1.1, 1.0),
                        study_uid=study)  # also 1 mm, fewer slices
    coarse = ct_series(stored_volume(rng, (9, *SHAPE), False), np.arange(-20.0, 0.1, 2.5),
                       study_uid=study)  # 2.5 mm: thinner than thick, not the thinnest
    finest_elsewhere = ct_series(stored_volume(rng, (4, *SHAPE), False),
                                 [100.0, 100.5, 101.0, 101.5], study_uid=study)
    short_thick = ct_series(stored_volume(rng, (2, *SHAPE), False), [-20.0, -15.0],
                            study_uid=study)  # 5 mm too, fewer slices than the real thick
    members = case.members + partial + coarse + finest_elsewhere + short_thick
    pair = read_case(write_zip(tmp_path / "many.zip", members, rng))
    np.testing.assert_array_equal(pair.thin.hu, case.thin_hu)
    np.testing.assert_array_equal(pair.thick.hu, case.thick_hu)
    assert pair.n_ignored == len(case.others) + 5 + 9 + 4 + 2


def test_peak_memory_is_about_twice_the_pixel_bytes(tmp_path, rng):
    study = generate_uid()
    thick = stored_volume(rng, (8, 256, 256), False)
    thin = stored_volume(rng, (40, 256, 256), False)
    members = (ct_series(thick, np.arange(8) * 5.0, study_uid=study)
               + ct_series(thin, np.arange(40) * 1.0, study_uid=study))
    path = write_zip(tmp_path / "mem.zip", members, rng, stored=True)
    raw_bytes = thick.nbytes + thin.nbytes
    tracemalloc.start()
    try:
        pair = read_case(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert pair.thin.shape == (40, 256, 256)
    assert peak < 2.3 * raw_bytes, peak / raw_bytes  # datasets + volume, no third copy


def test_hu_matches_pydicom_modality_lut(tmp_path, rng):
    case = make_case(rng, slope=2.0, intercept=-2048.0, bits_stored=12)
    pair = read_case(write_zip(tmp_path / "c.zip", case.members, rng))
    for volume, members in ((pair.thick, case.thick), (pair.thin, case.thin)):
        z, hu = reference_volume(members)
        np.testing.assert_allclose(volume.z_mm, z)
        np.testing.assert_array_equal(volume.hu, hu)
    np.testing.assert_array_equal(pair.thin.hu, case.thin_hu)
    assert pair.thin.hu.min() == -1024 and pair.thin.hu.max() > 3000  # below air: padding


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize("syntax", [
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, JPEG2000Lossless,
    DeflatedExplicitVRLittleEndian,
], ids=lambda s: s.keyword)
def test_transfer_syntaxes_give_identical_hu(tmp_path, rng, syntax, signed):
    intercept = 0.0 if signed else -1024.0
    case = make_case(rng, syntax=syntax, signed=signed, intercept=intercept)
    tsyntax = pydicom.dcmread(io.BytesIO(case.thin[0])).file_meta.TransferSyntaxUID
    assert tsyntax == syntax  # the fixture really wrote that syntax
    pair = read_case(write_zip(tmp_path / "s.zip", case.members, rng))
    np.testing.assert_array_equal(pair.thick.hu, case.thick_hu)
    np.testing.assert_array_equal(pair.thin.hu, case.thin_hu)
    assert pair.thin.hu.min() < -1000  # negative HU survive every path


def test_rescale_per_slice_rounds_and_clips(tmp_path, rng):
    study, uid = generate_uid(), generate_uid()
    stored = stored_volume(rng, (4, *SHAPE), signed=False)
    stored[3, 0, 0] = 65535  # 65535 HU does not fit int16: clipped
    rescale = [(1.0, -1024.0), (0.5, -1000.0), (1.0, -1000.5), (1.0, 0.0)]
    thin = [ct_slice(stored[k], (0.0, 0.0, float(k)), series_uid=uid, study_uid=study,
                     slope=s, intercept=i) for k, (s, i) in enumerate(rescale)]
    thick = ct_series(stored_volume(rng, (2, *SHAPE), False), [0.0, 3.0], study_uid=study)
    pair = read_case(write_zip(tmp_path / "r.zip", thin + thick, rng))
    expected = np.stack([np.rint(stored[k] * s + i) for k, (s, i) in enumerate(rescale)])
    np.testing.assert_array_equal(pair.thin.hu, np.clip(expected, -1024, 32767))
    assert pair.thin.hu[3, 0, 0] == 32767


def test_feet_first_orientation_sorts_along_the_normal(tmp_path, rng):
    flipped = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0)  # normal = -z: z_mm = -IPP z
    study = generate_uid()
    thick = stored_volume(rng, (3, *SHAPE), False)
    thin = stored_volume(rng, (7, *SHAPE), False)
    members = (ct_series(thick, [0.0, 3.0, 6.0], study_uid=study, orientation=flipped)
               + ct_series(thin, np.arange(7.0), study_uid=study, orientation=flipped))
    pair = read_case(write_zip(tmp_path / "f.zip", members, rng))
    np.testing.assert_allclose(pair.thick.z_mm, [-6.0, -3.0, 0.0])
    np.testing.assert_array_equal(pair.thick.hu, thick[::-1].astype(np.int64) - 1024)
    assert pair.thick.origin_mm == pytest.approx((-100.0, -120.0, 6.0))
    assert pair.thin.orientation == flipped


def test_folder_case_equals_zip_case(tmp_path, rng):
    case = make_case(rng, syntax=RLELossless)
    root = write_folder(tmp_path / "case", case.members, rng, {"notes.txt": b"hello"})
    (root / "__MACOSX").mkdir()
    (root / "__MACOSX" / "._x.dcm").write_bytes(case.thin[0])  # would be a duplicate slice
    outside = tmp_path / "outside.dcm"
    outside.write_bytes(case.thin[1])
    os.symlink(outside, root / "link.dcm")  # not followed
    from_folder = read_case(root)
    from_zip = read_case(write_zip(tmp_path / "case.zip", case.members, rng))
    np.testing.assert_array_equal(from_folder.thin.hu, from_zip.thin.hu)
    np.testing.assert_array_equal(from_folder.thick.hu, case.thick_hu)
    assert (from_folder.n_files, from_folder.n_ignored) == (34, 6)


def test_iter_members_skips_directories_and_macos_metadata(tmp_path):
    path = tmp_path / "m.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("dir/", b"")
        zf.writestr("__MACOSX/dir/._a", b"resource fork")
        zf.writestr("dir/a", b"A")
        zf.writestr("b", b"BB")
    assert list(iter_members(path)) == [b"A", b"BB"]


# ---------------------------------------------------------------------- real files from pydicom


def restamp(path: str, series_uid: str, z_mm: float, **changes) -> bytes:
    """A copy of a shipped file moved to another position and series; pixels untouched."""
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = series_uid
    ipp = [float(v) for v in ds.ImagePositionPatient]
    ds.ImagePositionPatient = [ipp[0], ipp[1], z_mm]
    for key, value in changes.items():
        setattr(ds, key, value)
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def shipped_pair(name: str, thick_z, thin_z, **changes) -> tuple[list[bytes], list[bytes]]:
    path = get_testdata_file(name)
    thick_uid, thin_uid = generate_uid(), generate_uid()
    thick = [restamp(path, thick_uid, z, **changes) for z in thick_z]
    thin = [restamp(path, thin_uid, z, **changes) for z in thin_z]
    return thick, thin


def test_real_ct_small_series(tmp_path, rng):
    path = get_testdata_file("CT_small.dcm")
    base = pydicom.dcmread(path).pixel_array  # int16, signed, slope 1, intercept -1024
    thin_uid = generate_uid()
    thin = []
    for k, z in enumerate(np.arange(-75.7, -68.0, 1.25)):  # distinct pixels per slice
        ds = pydicom.dcmread(io.BytesIO(restamp(path, thin_uid, float(z))))
        ds.PixelData = (base + 10 * k).astype(np.int16).tobytes()
        buf = io.BytesIO()
        ds.save_as(buf)
        thin.append(buf.getvalue())
    thick, _ = shipped_pair("CT_small.dcm", [-75.7, -70.7], [])
    pair = read_case(write_zip(tmp_path / "ct.zip", thick + thin, rng))
    z, hu = reference_volume(thin)
    np.testing.assert_allclose(pair.thin.z_mm, z)
    np.testing.assert_array_equal(pair.thin.hu, hu)
    np.testing.assert_array_equal(pair.thin.hu[3], base.astype(np.int64) + 30 - 1024)
    assert pair.thin.spacing_mm == pytest.approx((1.25, 0.661468, 0.661468))
    assert pair.thick.spacing_mm[0] == pytest.approx(5.0)
    assert pair.thick.origin_mm == pytest.approx((-158.135803, -179.035797, -75.7))


def test_real_jpeg2000_with_pixel_representation_mismatch(tmp_path, rng):
    """A 13-bit unsigned J2K codestream in a header that says signed: pydicom reinterprets it."""
    from openjpeg import decode

    path = get_testdata_file("J2K_pixelrep_mismatch.dcm")
    ds = pydicom.dcmread(path)
    assert (ds.PixelRepresentation, ds.BitsStored, ds.RescaleIntercept) == (1, 13, 0)
    raw = decode(next(generate_frames(ds.PixelData, number_of_frames=1))).astype(np.int64)
    assert raw.min() >= 0 and raw.max() == 8191  # unsigned in the codestream
    expected = np.where(raw >= 4096, raw - 8192, raw)  # 13-bit two's complement, per header

    # As shipped it is 22 degrees off axial (gantry tilt): not taken for an axial series.
    thick, thin = shipped_pair("J2K_pixelrep_mismatch.dcm", [0.0, 5.0], np.arange(0.0, 6.0))
    assert reason(write_zip(tmp_path / "tilted.zip", thick + thin, rng)) == "no axial CT series"

    axial = dict(ImageOrientationPatient=[1, 0, 0, 0, 1, 0])
    thick, thin = shipped_pair("J2K_pixelrep_mismatch.dcm", [0.0, 5.0], np.arange(0.0, 6.0),
                               **axial)
    pair = read_case(write_zip(tmp_path / "j2k.zip", thick + thin, rng))
    assert pair.thin.shape == (6, 512, 512) and pair.thick.shape == (2, 512, 512)
    for k in range(6):
        np.testing.assert_array_equal(pair.thin.hu[k], to_air(expected))
    assert pair.thin.hu.min() == -1024  # padding (-2000 once sign-corrected, not 6192) → air
    assert pair.thin.spacing_mm == pytest.approx((1.0, 0.431, 0.431))


@pytest.mark.parametrize("name", [
    "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm", "MR_small_RLE.dcm",
])
def test_third_party_codestreams_match_uncompressed_twin(tmp_path, rng, name):
    """pydicom ships one image encoded several ways (JPEG-LS included): relabelled as CT."""
    reference = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array.astype(np.int64)
    ct = dict(Modality="CT", RescaleSlope=1, RescaleIntercept=-1024)
    thick, thin = shipped_pair(name, [0.0, 4.0], np.arange(0.0, 5.0), **ct)
    pair = read_case(write_zip(tmp_path / "mr.zip", thick + thin, rng))
    np.testing.assert_array_equal(pair.thin.hu, np.stack([reference - 1024] * 5))
    np.testing.assert_array_equal(pair.thick.hu, np.stack([reference - 1024] * 2))


# ---------------------------------------------------------------------- errors and reasons


def test_corrupt_zip(tmp_path, rng):
    path = tmp_path / "random.zip"
    path.write_bytes(rng.bytes(5000))
    assert reason(path) == "corrupt zip"
    half = write_zip(tmp_path / "half.zip", make_case(rng).members, rng)
    half.write_bytes(half.read_bytes()[: half.stat().st_size // 2])  # central directory lost
    assert reason(half) == "corrupt zip"


def test_crc_error_names_member_index(tmp_path, rng):
    path = write_zip(tmp_path / "crc.zip", make_case(rng).members, rng, stored=True)
    with zipfile.ZipFile(path) as zf:
        info = zf.infolist()[7]
    data = bytearray(path.read_bytes())
    data[info.header_offset + 30 + len(info.filename.encode()) + 500] ^= 0xFF  # member body
    path.write_bytes(bytes(data))
    assert reason(path) == "corrupt zip: bad member #7"


@pytest.mark.parametrize("name", ["../evil.dcm", "a/../../evil.dcm", "/etc/evil.dcm",
                                  "C:/evil.dcm", "..\\evil.dcm"])
def test_unsafe_member_path(tmp_path, rng, name):
    case = make_case(rng)
    path = write_zip(tmp_path / "evil.zip", case.members, rng, {name: case.thin[0]})
    assert reason(path).startswith("unsafe path in zip (member #")


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, JPEG2000Lossless],
                         ids=["native", "j2k"])
def test_truncated_pixel_data(tmp_path, rng, syntax):
    case = make_case(rng, syntax=syntax)
    case.thin[6] = case.thin[6][:-700]  # z = -15: the 7th thin slice
    assert reason(write_zip(tmp_path / "t.zip", case.members, rng)) == (
        "truncated DICOM in thin series, slice 6")


def test_truncated_header_is_a_missing_slice(tmp_path, rng):
    case = make_case(rng)
    case.thin[6] = case.thin[6][:300]  # cannot be identified: ignored, leaving a gap
    assert reason(write_zip(tmp_path / "h.zip", case.members, rng)) == (
        "missing slice at z=-15.0 mm in thin series")


def test_missing_slice_names_its_position(tmp_path, rng):
    case = make_case(rng)
    del case.thick[2]  # z = -10
    assert reason(write_zip(tmp_path / "m.zip", case.members, rng)) == (
        "missing slice at z=-10.0 mm in thick series")


def test_duplicate_positions(tmp_path, rng):
    case = make_case(rng)
    uid = pydicom.dcmread(io.BytesIO(case.thin[0])).SeriesInstanceUID
    extra = ct_slice(stored_volume(rng, (1, *SHAPE), False)[0], (-100.0, -120.0, -5.0),
                     series_uid=uid, study_uid=generate_uid())
    assert reason(write_zip(tmp_path / "d.zip", case.members + [extra], rng)) == (
        "duplicate slice at z=-5.0 mm in thin series")


def test_only_one_series(tmp_path, rng):
    case = make_case(rng)
    path = write_zip(tmp_path / "one.zip", case.thick + case.others, rng)
    assert reason(path) == "no thin series (only one axial CT series, spacing 5.00 mm)"


def test_series_with_equal_spacing(tmp_path, rng):
    case = make_case(rng)
    again = ct_series(stored_volume(rng, (5, *SHAPE), False), THICK_Z + 0.5,
                      study_uid=generate_uid())
    path = write_zip(tmp_path / "eq.zip", case.thick + again, rng)
    assert reason(path) == "no thin series (all 2 axial CT series have spacing ~5.00 mm)"


def test_no_axial_ct(tmp_path, rng):
    case = make_case(rng)
    assert reason(write_zip(tmp_path / "n.zip", case.others, rng)) == "no axial CT series"


def test_thin_series_elsewhere_in_z(tmp_path, rng):
    case = make_case(rng)
    far = ct_series(stored_volume(rng, (4, *SHAPE), False), [300.0, 301.0, 302.0, 303.0],
                    study_uid=generate_uid())
    path = write_zip(tmp_path / "far.zip", case.thick + far, rng)
    assert reason(path) == "no thin series overlapping the thick series in z"


def test_in_plane_grid_mismatch(tmp_path, rng):
    case = make_case(rng, thin_kwargs=dict(pixel_spacing_mm=(0.6, 0.6)))
    assert reason(write_zip(tmp_path / "g.zip", case.members, rng)) == (
        "thick and thin series differ in in-plane grid")


def test_unsupported_transfer_syntax(tmp_path, rng):
    case = make_case(rng, syntax=JPEG2000Lossless)
    relabelled = []
    for data in case.thin:  # JPEG XL: a real syntax that pydicom 3.0 cannot decode
        ds = pydicom.dcmread(io.BytesIO(data))
        ds.file_meta.TransferSyntaxUID = MPEG2MPML  # same UID length as JPEG XL
        buf = io.BytesIO()
        ds.save_as(buf)
        relabelled.append(buf.getvalue().replace(MPEG2MPML.encode(), b"1.2.840.10008.1.2.4.110"))
    case.thin = relabelled
    assert reason(write_zip(tmp_path / "xl.zip", case.members, rng)) == (
        "unsupported transfer syntax 1.2.840.10008.1.2.4.110")


def test_corrupt_codestream(tmp_path, rng):
    case = make_case(rng, syntax=JPEG2000Lossless)
    ds = pydicom.dcmread(io.BytesIO(case.thick[1]))
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([bytes(len(frame))])  # a well-framed item of zeros
    buf = io.BytesIO()
    ds.save_as(buf)
    case.thick[1] = buf.getvalue()
    assert reason(write_zip(tmp_path / "cs.zip", case.members, rng)) == (
        "cannot decode pixel data: RuntimeError")


def test_member_size_checked_from_directory_before_inflating(tmp_path, rng):
    path = write_zip(tmp_path / "lie.zip", make_case(rng).members, rng)
    data = bytearray(path.read_bytes())
    central = data.find(b"PK\x01\x02")  # first central directory entry = member #0
    data[central + 24: central + 28] = (3 << 30).to_bytes(4, "little")  # claims 3 GiB
    path.write_bytes(bytes(data))
    assert reason(path) == "member #0 too large (3.0 GiB uncompressed)"


def test_reasons_use_the_zip_directory_index(tmp_path):
    path = tmp_path / "idx.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a/", b"")  # a directory entry still takes index 0
        zf.writestr("__MACOSX/._b", b"x")
        zf.writestr("a/b", b"1")
        zf.writestr("a/zeros", bytes(4 << 20))
    assert reason(path).startswith("zip bomb-like member #3 (compression ratio ")


def test_zip_bomb_like_ratio(tmp_path, rng):
    case = make_case(rng)
    path = write_zip(tmp_path / "bomb.zip", case.members, rng, {"z/zeros": bytes(4 << 20)})
    assert reason(path).startswith("zip bomb-like member #")
    lenient = ArchiveLimits(max_ratio=1e6)
    assert read_case(path, lenient).n_ignored == 6


def test_total_size_limit(tmp_path, rng):
    path = write_zip(tmp_path / "big.zip", make_case(rng).members, rng)
    assert reason(path, ArchiveLimits(max_total_bytes=20_000)) == (
        "case too large (over 20000 bytes uncompressed)")


def test_missing_case_path(tmp_path):
    assert reason(tmp_path / "nope.zip") == "case not found"


def test_library_does_not_import_prefect():
    code = "import sys, ctdiff.dicom, ctdiff.archive; assert 'prefect' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------- found by fuzzing
# Each failed before its fix in ctdiff/dicom.py or ctdiff/archive.py (tests/test_dicom_fuzz.py).


def edited(data: bytes, **changes) -> bytes:
    """A member re-encoded with header changes; a value of None deletes the element."""
    ds = pydicom.dcmread(io.BytesIO(data))
    for key, value in changes.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")
@pytest.mark.parametrize("changes, expected", [
    # without the check: slice 4 read 1024 HU too low (intercept 0), or NaN cast to int16
    (dict(RescaleIntercept=None), "missing RescaleIntercept in thin series, slice 4"),
    (dict(RescaleIntercept=""), "missing RescaleIntercept in thin series, slice 4"),
    (dict(RescaleSlope=None, RescaleIntercept=None),
     "missing RescaleSlope in thin series, slice 4"),
    (dict(RescaleSlope="nan"), "invalid RescaleSlope in thin series, slice 4"),
    (dict(RescaleSlope="0"), "invalid RescaleSlope in thin series, slice 4"),
    (dict(RescaleIntercept="inf"), "invalid RescaleIntercept in thin series, slice 4"),
], ids=["no-intercept", "empty-intercept", "no-rescale", "nan-slope", "zero-slope",
        "inf-intercept"])
def test_rescale_lost_by_one_slice_or_invalid(tmp_path, rng, changes, expected):
    case = make_case(rng)
    case.thin[4] = edited(case.thin[4], **changes)
    assert reason(write_zip(tmp_path / "r.zip", case.members, rng)) == expected


def test_series_without_rescale_reads_stored_values(tmp_path, rng):
    case = make_case(rng, signed=True, intercept=0.0)
    case.thin = [edited(m, RescaleSlope=None, RescaleIntercept=None) for m in case.thin]
    pair = read_case(write_zip(tmp_path / "n.zip", case.members, rng))
    np.testing.assert_array_equal(pair.thin.hu, case.thin_hu)  # identity, as pydicom's LUT


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")
@pytest.mark.parametrize("value", ["nan", "inf"])
@pytest.mark.parametrize("k", [0, 11], ids=["first", "inner"])
def test_non_finite_position(tmp_path, rng, value, k):
    # without the check: a NaN z sorted anywhere, or (the warning an error) the slice dropped
    case = make_case(rng)
    case.thin[k] = edited(case.thin[k], ImagePositionPatient=["-100", value, "-5"])
    assert reason(write_zip(tmp_path / "p.zip", case.members, rng)) == (
        "non-finite ImagePositionPatient in thin series")


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")
def test_unplaceable_grid_is_not_an_axial_series(tmp_path, rng):
    case = make_case(rng)
    zero_dy = [edited(m, PixelSpacing=["0", "0.8"]) for m in case.thin]  # was read with dy = 0
    path = write_zip(tmp_path / "s.zip", case.thick + zero_dy, rng)
    assert reason(path) == "no thin series (only one axial CT series, spacing 5.00 mm)"
    case.thick[2] = edited(case.thick[2], ImageOrientationPatient=["nan", 0, 0, 0, 1, 0])
    path = write_zip(tmp_path / "o.zip", case.members, rng)
    assert reason(path) == "missing slice at z=-10.0 mm in thick series"


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("uid, expected", [
    ("", "unsupported transfer syntax (none given)"),  # was AttributeError: 'str' ... 'name'
    ("not a uid", "unsupported transfer syntax (not a valid UID)"),
])
def test_empty_or_invalid_transfer_syntax(tmp_path, rng, uid, expected):
    case = make_case(rng, syntax=RLELossless)
    padded = uid.encode().ljust(20, b"\0")  # the element keeps its length: 20 bytes
    case.thin[3] = case.thin[3].replace(b"1.2.840.10008.1.2.5\0", padded)
    assert reason(write_zip(tmp_path / "u.zip", case.members, rng)) == expected


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_encapsulated_pixel_data_under_native_syntax(tmp_path, rng):
    """RLE fragments labelled Explicit VR Little Endian: they were read as pixels, wrong HU."""
    case = make_case(rng, syntax=RLELossless)
    case.thin[5] = case.thin[5].replace(b"1.2.840.10008.1.2.5\0", b"1.2.840.10008.1.2.1\0")
    assert reason(write_zip(tmp_path / "e.zip", case.members, rng)) == (
        "encapsulated pixel data under uncompressed transfer syntax Explicit VR Little Endian"
        " in thin series, slice 5")


@pytest.mark.parametrize("keyword", ["BitsAllocated", "PixelRepresentation"])
def test_missing_pixel_module_element(tmp_path, rng, keyword):
    # BitsAllocated: was AttributeError from the length check; others "cannot decode ...".
    case = make_case(rng)
    case.thick[1] = edited(case.thick[1], **{keyword: None})
    assert reason(write_zip(tmp_path / "b.zip", case.members, rng)) == (
        f"missing {keyword} in thick series, slice 1")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_garbled_vr_is_a_missing_slice(tmp_path, rng):
    """A VR flipped in an element that identification does not read (BitsAllocated) used to
    raise NotImplementedError from pydicom's lazy conversion, at decoding."""
    case = make_case(rng)
    data = bytearray(case.thin[6])
    at = data.find(b"\x28\x00\x00\x01US")  # (0028,0100) BitsAllocated, explicit VR "US"
    data[at + 4: at + 6] = b"U\x1a"
    case.thin[6] = bytes(data)
    assert reason(write_zip(tmp_path / "v.zip", case.members, rng)) == (
        "missing slice at z=-15.0 mm in thin series")


def test_rle_decoder_panic_is_a_decode_error(tmp_path, rng):
    """pylibjpeg-rle panics (pyo3 PanicException, a BaseException) on runs past the frame."""
    case = make_case(rng, syntax=RLELossless)
    ds = pydicom.dcmread(io.BytesIO(case.thick[2]))
    segment = bytes([0x81, 7]) * 20  # replicate runs of 128 bytes: 2560 > 32 * 40 per segment
    header = b"".join(v.to_bytes(4, "little") for v in (2, 64, 64 + len(segment))) + bytes(52)
    ds.PixelData = encapsulate([header + segment + segment])
    buf = io.BytesIO()
    ds.save_as(buf)
    case.thick[2] = buf.getvalue()
    assert reason(write_zip(tmp_path / "p.zip", case.members, rng)) == (
        "cannot decode pixel data: PanicException")


def test_corrupt_bzip2_member_is_corrupt_zip(tmp_path, rng):
    """A member relabelled bzip2: the decompressor's OSError (no errno) was let through as a
    transient storage failure, to be retried forever instead of quarantined."""
    path = write_zip(tmp_path / "bz.zip", make_case(rng).members, rng)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.infolist()[3]
    central = data.find(b"PK\x01\x02")
    for _ in range(3):
        central = data.find(b"PK\x01\x02", central + 4)
    for at in (info.header_offset + 8, central + 10):  # compression method: local, central
        data[at: at + 2] = zipfile.ZIP_BZIP2.to_bytes(2, "little")
    path.write_bytes(bytes(data))
    assert reason(path) == "corrupt zip: bad member #3"


# ---------------------------------------------------------------------- reading in pieces


def test_open_case_reads_in_runs_what_read_case_loads(tmp_path, rng):
    case = make_case(rng, slope=2.0, intercept=-2048.0)
    path = write_zip(tmp_path / "c.zip", case.members, rng)
    whole = read_case(path)
    opened = open_case(path)
    assert (opened.n_files, opened.n_ignored) == (whole.n_files, whole.n_ignored)
    for reader, volume in ((opened.thin, whole.thin), (opened.thick, whole.thick)):
        assert reader.shape == volume.shape and reader.spacing_mm == volume.spacing_mm
        np.testing.assert_array_equal(reader.z_mm, volume.z_mm)
        assert reader.origin_mm == volume.origin_mm and reader.orientation == volume.orientation
        depth = volume.shape[0]
        runs = [reader.read_hu(start, min(start + 3, depth)) for start in range(0, depth, 3)]
        np.testing.assert_array_equal(np.concatenate(runs), volume.hu)
    with pytest.raises(RuntimeError, match="already read"):  # its dataset was dropped
        opened.thin.read_hu(0, 1)


def test_cropped_reader_is_the_cropped_volume(tmp_path, rng):
    case = make_case(rng)
    path = write_zip(tmp_path / "c.zip", case.members, rng)
    expected = read_case(path).thin.crop(2, 7)
    cropped = open_case(path).thin.crop(2, 7)
    assert cropped.shape == expected.shape and cropped.origin_mm == expected.origin_mm
    np.testing.assert_array_equal(cropped.z_mm, expected.z_mm)
    np.testing.assert_array_equal(cropped.read_hu(0, 5), expected.hu)


@pytest.mark.parametrize("signed, bits_stored", [(False, 16), (True, 16), (True, 12), (False, 12)])
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                                    DeflatedExplicitVRLittleEndian], ids=lambda s: s.keyword)
def test_native_pixels_equal_pydicoms_decoder(rng, syntax, signed, bits_stored):
    """16-bit native pixels are read straight from the buffer; pydicom decodes the rest."""
    from ctdiff.dicom import _pixels

    stored = stored_volume(rng, (1, 12, 10), signed)[0]
    if bits_stored == 12:
        stored = stored >> 4  # values that fit 12 bits
    data = ct_slice(stored, (0.0, 0.0, 0.0), series_uid=generate_uid(), study_uid=generate_uid(),
                    bits_stored=bits_stored, syntax=syntax)
    ds = pydicom.dcmread(io.BytesIO(data))
    ours = _pixels(ds, "thin", 0)
    assert ours.dtype == ds.pixel_array.dtype
    np.testing.assert_array_equal(ours, ds.pixel_array)
    np.testing.assert_array_equal(ours, stored)


def test_zip_members_read_as_zipfile_reads_them(tmp_path, rng):
    """Deflated and stored members take ISA-L's path, bzip2 and lzma zipfile's; all equal."""
    path = tmp_path / "mixed.zip"
    payloads = [rng.bytes(3000) + bytes(5000), b"", b"x" * 70000, rng.bytes(10)]
    methods = [zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA]
    with zipfile.ZipFile(path, "w") as zf:
        for k, (data, method) in enumerate(zip(payloads * 2, methods + methods[::-1])):
            zf.writestr(f"m{k}.bin", data, compress_type=method)
    with zipfile.ZipFile(path) as zf:
        expected = [zf.read(info) for info in zf.infolist()]
    assert list(iter_members(path)) == expected


def test_deflated_member_damage_names_member_index(tmp_path, rng):
    path = write_zip(tmp_path / "d.zip", make_case(rng).members, rng)
    with zipfile.ZipFile(path) as zf:
        info = zf.infolist()[4]
    data = bytearray(path.read_bytes())
    data[info.header_offset + 30 + len(info.filename.encode()) + 200] ^= 0x5A  # deflate stream
    path.write_bytes(bytes(data))
    assert reason(path) == "corrupt zip: bad member #4"


def test_local_header_not_matching_directory_is_corrupt(tmp_path, rng):
    path = write_zip(tmp_path / "h.zip", make_case(rng).members, rng)
    with zipfile.ZipFile(path) as zf:
        info = zf.infolist()[2]
    data = bytearray(path.read_bytes())
    data[info.header_offset + 30] ^= 0x01  # first byte of the local header's file name
    path.write_bytes(bytes(data))
    assert reason(path) == "corrupt zip: bad member #2"
