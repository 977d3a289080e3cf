"""Inference I/O: NIfTI and derived DICOM series out, ZIP / DICOM folder / NIfTI in.

Geometry is checked against the Volume's own definition (voxel (d, h, w) at origin + w·dx·row +
h·dy·column + (z_d − z_0)·normal, LPS) and, for DICOM output, against dcm2niix as an
independent reader.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from dicom_fixtures import FAKE_PATIENT
from infer_fixtures import (
    ORIENTATIONS,
    assert_same_geometry,
    assert_same_image,
    dicom_template,
    make_volume,
    normal_of,
    rotation_matrix,
    small_synth_case,
    write_dicom_input,
)
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from ctdiff.dicom import read_series
from ctdiff.dicom_write import shared_template, write_dicom_series
from ctdiff.errors import CaseError
from ctdiff.infer_io import (
    STD_SERIES,
    check_output,
    check_output_name,
    output_format,
    read_thick,
    remove_output,
    std_output_path,
    write_output,
)
from ctdiff.nifti import read_nifti, write_nifti


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


# --- NIfTI -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ORIENTATIONS)
def test_write_nifti_affine_header_and_values(tmp_path, rng, name):
    volume = make_volume(ORIENTATIONS[name], rng)
    image = nib.load(write_nifti(volume, tmp_path / "thin.nii.gz"))
    row, col = np.array(volume.orientation[:3]), np.array(volume.orientation[3:])
    dz, dy, dx = volume.spacing_mm
    expected = np.eye(4)  # voxel (i, j, k) = (w, h, d); LPS -> RAS negates x and y
    expected[:3, :3] = np.diag([-1, -1, 1]) @ np.column_stack(
        [row * dx, col * dy, normal_of(volume.orientation) * dz])
    expected[:3, 3] = np.array(volume.origin_mm) * [-1, -1, 1]
    np.testing.assert_allclose(image.affine, expected, atol=1e-5)
    np.testing.assert_allclose(image.header.get_qform(), expected, atol=1e-5)
    assert image.header.get_qform(coded=True)[1] == 1 and image.header.get_sform(coded=True)[1] == 1
    assert image.header.get_xyzt_units() == ("mm", "sec")
    assert image.get_data_dtype() == np.int16
    assert image.shape == volume.shape[::-1]
    assert_same_image(volume, image)


@pytest.mark.parametrize("name", ORIENTATIONS)
def test_nifti_round_trip(tmp_path, rng, name):
    volume = make_volume(ORIENTATIONS[name], rng)
    path = write_nifti(volume, tmp_path / "thin.nii")
    back = read_nifti(path)
    assert_same_image(back, nib.load(path))  # same voxels in the same places
    if name == "flipped":  # read back in the plain axial frame: rows to the left, slices up
        assert back.orientation == pytest.approx(ORIENTATIONS["axial"], abs=1e-6)
        np.testing.assert_array_equal(back.hu, volume.hu[::-1, :, ::-1])
    else:
        assert_same_geometry(back, volume)
        np.testing.assert_array_equal(back.hu, volume.hu)


def test_read_nifti_permuted_flipped_axes(tmp_path, rng):
    """Slices along array axis 1, descending; x and y stored in RAS order: reordered to axial."""
    data = rng.integers(-1000, 2000, size=(10, 6, 12)).astype(np.float32) + 0.3  # (x, z, y)
    affine = np.array([[0.8, 0, 0, -20.0],  # axis 0: to the right (RAS +x), 0.8 mm
                       [0, 0, 0.7, 5.0],  # axis 2: anterior (RAS +y), 0.7 mm
                       [0, -3.0, 0, 60.0],  # axis 1: towards the feet, 3 mm
                       [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "scan.nii.gz")
    volume = read_nifti(tmp_path / "scan.nii.gz")
    assert volume.shape == (6, 12, 10)
    assert volume.spacing_mm == pytest.approx((3.0, 0.7, 0.8))
    assert volume.orientation == pytest.approx(ORIENTATIONS["axial"])
    assert np.all(np.diff(volume.z_mm) == pytest.approx(3.0))
    assert volume.z_mm[0] == pytest.approx(60.0 - 5 * 3.0)
    rounded = nib.Nifti1Image(np.rint(data), affine)  # HU are rounded to int16 on read
    assert_same_image(volume, rounded)


@pytest.mark.parametrize("case, reason", [
    ("4d", "one 3D volume"), ("sheared", "sheared"), ("sagittal_tilt", "not axial"),
    ("corrupt", "corrupt NIfTI"), ("truncated", "shorter than its header"), ("nan", "NaN"),
])
def test_read_nifti_refuses(tmp_path, case, reason):
    path = tmp_path / f"{case}.nii.gz"
    data = np.zeros((4, 4, 3), dtype=np.float32)
    affine = np.eye(4)
    if case == "4d":
        data = np.zeros((4, 4, 3, 2), dtype=np.float32)
    elif case == "sheared":
        affine[0, 2] = 0.5  # x moves with the slice index: gantry tilt
    elif case == "sagittal_tilt":
        affine[:3, :3] = rotation_matrix(0.0, 40.0)  # closest axis to z is still 40 deg off
    elif case == "nan":
        data[0, 0, 0] = np.nan
    if case == "corrupt":
        path.write_bytes(b"\x1f\x8b not really gzip")
    elif case == "truncated":
        path = tmp_path / "truncated.nii"
        nib.save(nib.Nifti1Image(data, affine), path)
        path.write_bytes(path.read_bytes()[:-10])
    else:
        nib.save(nib.Nifti1Image(data, affine), path)
    with pytest.raises(CaseError, match=reason):
        read_nifti(path)


# --- DICOM series out --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ORIENTATIONS)
def test_dicom_series_round_trip(tmp_path, rng, name):
    volume = make_volume(ORIENTATIONS[name], rng)
    template = dicom_template(study_uid=generate_uid())
    paths = write_dicom_series(volume, template, tmp_path / "out")
    assert [p.name for p in paths] == [f"IM{k:05d}.dcm" for k in range(1, 6)]
    normal = normal_of(volume.orientation)
    datasets = [pydicom.dcmread(p) for p in paths]
    for k, (path, ds) in enumerate(zip(paths, datasets)):
        assert path.read_bytes()[128:132] == b"DICM"
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID == CTImageStorage
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.StudyInstanceUID == template.StudyInstanceUID
        assert ds.FrameOfReferenceUID == template.FrameOfReferenceUID
        assert ds.PatientName == FAKE_PATIENT and ds.PatientID == template.PatientID
        assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert ds.InstanceNumber == k + 1 and ds.SeriesNumber == 1003
        expected_position = np.array(volume.origin_mm) + k * volume.spacing_mm[0] * normal
        np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient], expected_position,
                                   atol=1e-6)
        np.testing.assert_allclose([float(v) for v in ds.ImageOrientationPatient],
                                   volume.orientation, atol=1e-9)
        assert [float(v) for v in ds.PixelSpacing] == pytest.approx(volume.spacing_mm[1:])
        assert float(ds.SliceThickness) == float(ds.SpacingBetweenSlices) == volume.spacing_mm[0]
        hu = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
        np.testing.assert_array_equal(hu, volume.hu[k])
    uids = {ds.SOPInstanceUID for ds in datasets}
    assert len(uids) == 5 and template.SOPInstanceUID not in uids
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    assert datasets[0].SeriesInstanceUID != template.SeriesInstanceUID
    back = read_series(tmp_path / "out").volume  # and ctdiff's own reader agrees
    assert_same_geometry(back, volume)
    np.testing.assert_array_equal(back.hu, volume.hu)


def test_dicom_series_holds_values_below_air_and_fresh_study_without_template(tmp_path, rng):
    volume = make_volume(ORIENTATIONS["axial"], rng, low=-3024, high=32000)
    paths = write_dicom_series(volume, None, tmp_path / "out", uid_root="1.2.3.")
    ds = pydicom.dcmread(paths[0])
    assert int(ds.RescaleIntercept) == volume.hu.min()
    assert ds.SOPInstanceUID.startswith("1.2.3.") and ds.SeriesInstanceUID.startswith("1.2.3.")
    assert ds.PatientName == "ANONYMOUS" and ds.StudyInstanceUID.is_valid
    hu = ds.pixel_array.astype(np.int32) + int(ds.RescaleIntercept)
    np.testing.assert_array_equal(hu, volume.hu[0])


def test_dicom_output_folder_is_replaced_only_when_ours(tmp_path, rng):
    volume = make_volume(ORIENTATIONS["axial"], rng)
    out = tmp_path / "out"
    first_uid = pydicom.dcmread(write_dicom_series(volume, None, out)[0]).SeriesInstanceUID
    second = write_dicom_series(volume, None, out)  # a re-run replaces our own output
    assert len(second) == 5 and pydicom.dcmread(second[0]).SeriesInstanceUID != first_uid
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="other files"):
        write_dicom_series(volume, None, out)
    with pytest.raises(ValueError, match=r"\.nii\.gz path"):
        output_format(tmp_path / "thin.nrrd")


def test_shared_template_keeps_the_output_and_its_std_series_in_one_study(tmp_path, rng):
    volume = make_volume(ORIENTATIONS["oblique"], rng)
    for source in (None, dicom_template(generate_uid())):
        if source is not None:
            del source.FrameOfReferenceUID  # an input without one: the two series must share ours
        template = shared_template(source)
        write_output(volume, template, tmp_path / "out")
        write_output(volume, template, tmp_path / "out_std", STD_SERIES)
        thin = pydicom.dcmread(tmp_path / "out" / "IM00001.dcm")
        std = pydicom.dcmread(tmp_path / "out_std" / "IM00001.dcm")
        for keyword in ("StudyInstanceUID", "FrameOfReferenceUID", "StudyDate", "StudyTime",
                        "PatientName", "PatientID"):
            assert std[keyword].value == thin[keyword].value, keyword
        assert thin.FrameOfReferenceUID  # a real UID, not an empty one shared by both
        assert std.SeriesInstanceUID != thin.SeriesInstanceUID
        assert std.SeriesNumber == thin.SeriesNumber + 1
        assert std.SeriesDescription == "ctdiff thin uncertainty (std, HU)"
        assert "standard deviation" in std.DerivationDescription
        assert "synthesized" in thin.DerivationDescription
    assert "FrameOfReferenceUID" not in source  # the caller's header is left as it was
    assert thin.PatientName == FAKE_PATIENT


def test_std_output_path_check_output_and_remove_output(tmp_path, rng):
    assert std_output_path(tmp_path / "a.nii.gz") == tmp_path / "a_std.nii.gz"
    assert std_output_path(tmp_path / "a.NII") == tmp_path / "a_std.NII"
    assert std_output_path(tmp_path / "a.b") == tmp_path / "a.b_std"  # a DICOM folder
    assert std_output_path(f"{tmp_path}/a/") == tmp_path / "a_std"
    assert check_output(tmp_path / "a") == "dicom"
    (tmp_path / "a_std").mkdir()
    (tmp_path / "a_std" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="'a_std', where the uncertainty map goes: .*other files"):
        check_output(tmp_path / "a")
    with pytest.raises(ValueError, match="other files"):
        remove_output(tmp_path / "a_std")
    assert (tmp_path / "a_std" / "notes.txt").exists()

    volume = make_volume(ORIENTATIONS["axial"], rng)
    ours = [write_output(volume, None, tmp_path / "b_std"), write_output(volume, None, tmp_path / "c.nii")]
    assert ours == ["dicom", "nifti"]
    remove_output(tmp_path / "b_std")
    remove_output(tmp_path / "c.nii")
    remove_output(tmp_path / "missing.nii.gz")  # nothing there: nothing to do
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_std"]


# On PATH, or beside this interpreter: the `test` extra installs it into the venv, whose bin/ is
# not on PATH when pytest runs as .venv/bin/pytest without activating it.
DCM2NIIX = shutil.which("dcm2niix") or shutil.which("dcm2niix", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(DCM2NIIX is None,
                    reason="dcm2niix is not installed (pip install -e '.[test]' or apt-get install "
                           "dcm2niix); it is the independent reader of our DICOM output")
@pytest.mark.parametrize("name", ORIENTATIONS)
def test_dcm2niix_reads_our_series_as_we_do(tmp_path, rng, name):
    volume = make_volume(ORIENTATIONS[name], rng)
    write_dicom_series(volume, dicom_template(generate_uid()), tmp_path / "dicom")
    out = tmp_path / "nifti"
    out.mkdir()
    run = subprocess.run([DCM2NIIX, "-z", "n", "-b", "n", "-f", "converted", "-o", str(out),
                          str(tmp_path / "dicom")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert sorted(p.name for p in out.iterdir()) == ["converted.nii"], run.stdout
    theirs = nib.load(out / "converted.nii")
    ours = nib.load(write_nifti(volume, tmp_path / "ours.nii.gz"))
    assert sorted(theirs.shape) == sorted(ours.shape)
    assert sorted(theirs.header.get_zooms()) == pytest.approx(sorted(ours.header.get_zooms()), abs=1e-4)
    canonical_theirs, canonical_ours = nib.as_closest_canonical(theirs), nib.as_closest_canonical(ours)
    np.testing.assert_allclose(canonical_theirs.affine, canonical_ours.affine, atol=1e-3)
    assert_same_image(volume, theirs)


# --- Reading the thick input ---------------------------------------------------------------------


def test_read_thick_zip_picks_the_thick_series_with_its_header(tmp_path):
    thick = read_thick(small_synth_case(tmp_path))
    assert thick.source == "dicom"
    assert thick.volume.shape == (4, 16, 16) and thick.volume.spacing_mm[0] == pytest.approx(5.0)
    assert "PixelData" not in thick.template
    assert thick.template.SeriesDescription == "Chest 5 mm"
    assert thick.template.ImagePositionPatient[2] == pytest.approx(thick.volume.z_mm[0])
    thin = read_series(small_synth_case(tmp_path / "again"), "thinnest")
    assert thin.volume.shape[0] == 22 and thin.n_ignored == 4 + 2  # thick, scout, dose report


@pytest.mark.parametrize("name", ["flipped", "oblique"])
def test_read_thick_dicom_folder_and_nifti_agree(tmp_path, rng, name):
    volume = make_volume(ORIENTATIONS[name], rng, spacing=(5.0, 0.7, 0.8))
    from_dicom = read_thick(write_dicom_input(tmp_path / "case", volume, rng))
    assert from_dicom.source == "dicom" and from_dicom.template is not None
    assert_same_geometry(from_dicom.volume, volume, atol=1e-3)  # IOP/IPP text has 6/4 decimals
    np.testing.assert_array_equal(from_dicom.volume.hu, volume.hu)
    from_nifti = read_thick(write_nifti(volume, tmp_path / "case.nii.gz"))
    assert from_nifti.source == "nifti" and from_nifti.template is None
    assert_same_image(from_nifti.volume, nib.load(tmp_path / "case.nii.gz"))


def test_read_thick_refusals(tmp_path, rng):
    volume = make_volume(ORIENTATIONS["axial"], rng)
    folder = write_dicom_input(tmp_path / "dup", volume, rng)
    first = sorted(p for p in folder.rglob("*") if p.is_file())[0]
    shutil.copy(first, first.with_name("copy"))  # the same slice twice
    with pytest.raises(CaseError, match=r"duplicate slice at z=.* in thick series"):
        read_thick(folder)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CaseError, match="unsupported input"):
        read_thick(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CaseError, match="no axial CT series"):
        read_thick(tmp_path / "empty")
    with pytest.raises(CaseError, match="input not found"):
        read_thick(tmp_path / "missing.zip")


def test_check_output_name_takes_nifti_or_a_folder_name_without_a_suffix(tmp_path):
    for ok in ("thin.nii.gz", "thin.NII", "thin", "thin/"):
        check_output_name(f"{tmp_path}/{ok}")
    (tmp_path / "series.2024").mkdir()
    check_output_name(tmp_path / "series.2024")  # a folder that exists is a folder
    for bad in ("thin.txt", "thin.png", "thin.nrrd", "thin.gz", "series.2025"):
        with pytest.raises(ValueError, match=r"give OUT\.nii or OUT\.nii\.gz for NIfTI, or a folder name"):
            check_output_name(tmp_path / bad)
    with pytest.raises(ValueError, match=r"\.nii\.gz path"):  # the library's own refusal, batch paths included
        output_format(tmp_path / "thin.png")
