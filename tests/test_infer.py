"""ctdiff.infer: thick in, thin out, model HU inside the window and cubic HU outside it.

The predictor here is linear z-interpolation of the windowed volume: deterministic, and exact
on volumes that are constant along z, so output HU can be checked value by value.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pydicom
import pytest
from infer_fixtures import (
    ORIENTATIONS,
    assert_same_geometry,
    assert_same_image,
    make_volume,
    normal_of,
    small_synth_case,
    write_dicom_input,
)

from ctdiff.dicom import read_series
from ctdiff.errors import CaseError
from ctdiff.infer import discover_inputs, infer_batch, infer_case, merge_hu
from ctdiff.interpolate import interpolate_z
from ctdiff.nifti import read_nifti, write_nifti
from ctdiff.volume import Volume
from ctdiff.windowing import apply_window

WINDOW = (40.0, 400.0)  # soft tissue: [-160, 240] HU


def linear(thick_windowed: np.ndarray, thick_z_mm: np.ndarray, thin_z_mm: np.ndarray) -> np.ndarray:
    return interpolate_z(thick_windowed, thick_z_mm, thin_z_mm, "linear")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(11)


def tissue_volume(orientation, rng) -> Volume:
    """Air, soft tissue, fat and bone in columns, constant along z; 4 slices of 5 mm."""
    volume = make_volume(orientation, rng, shape=(4, 12, 10), spacing=(5.0, 0.7, 0.8))
    volume.hu[:, :, :4] = -1000  # air
    volume.hu[:, :, 4:7] = 40  # soft tissue, inside the window
    volume.hu[:, :3, 4:7] = -100  # fat, inside the window
    volume.hu[:, :, 7:] = 1000  # bone
    return volume


def expected_columns(hu: np.ndarray) -> None:
    assert np.all(hu[..., :4] == -1000) and np.all(hu[..., 7:] == 1000)
    assert np.all(hu[..., 3:, 4:7] == 40) and np.all(hu[..., :3, 4:7] == -100)


def test_merge_hu_golden_values():
    cubic = np.array([-1100, -1000, -160, -150, -140, -120, 40, 200, 220, 240, 1000], np.float32)
    model = np.zeros_like(cubic)  # the model says 0 HU everywhere
    pred = apply_window(model, *WINDOW)
    out = merge_hu(pred[:, None, None], cubic[:, None, None], *WINDOW)[:, 0, 0]
    # Band = 40 HU inside each edge. -150: t = 0.25, smoothstep 0.15625, -150 + 0.15625 * 150
    # = -126.56; -140 and 220: t = 0.5, half way; below air: clipped to air.
    expected = [-1024, -1000, -160, -127, -70, 0, 0, 0, 110, 240, 1000]
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == np.int16


def test_merge_hu_has_no_seam_at_the_window_edges():
    cubic = np.arange(-400.0, 500.0, 0.5, dtype=np.float32)[:, None, None]
    pred = apply_window(np.zeros_like(cubic), *WINDOW)  # 0 HU: 160 HU off at the lower edge
    out = merge_hu(pred, cubic, *WINDOW)[:, 0, 0].astype(float)
    # Steepest at the upper edge's mid-band: |0.5 - 1.5 / 40 * 220| ~ 8 HU per HU, so at most
    # 4 HU per 0.5 HU step plus 1 of rounding; a hard switch would jump by 160 or 240 HU.
    assert np.max(np.abs(np.diff(out))) <= 5


def expected_thin(thick: Volume, thin_mm: float) -> Volume:
    """Where the thin slices must be: from half a thick slab below the first thick slice."""
    n = int(round(thick.shape[0] * thick.spacing_mm[0] / thin_mm))
    offset = -thick.spacing_mm[0] / 2 + thin_mm / 2
    z = thick.z_mm[0] + offset + thin_mm * np.arange(n)
    pred = linear(thick.window(*WINDOW), thick.z_mm, z)
    hu = merge_hu(pred, interpolate_z(thick.hu, thick.z_mm, z, "cubic"), *WINDOW)
    origin = np.array(thick.origin_mm) + offset * normal_of(thick.orientation)
    return Volume(hu, (thin_mm, *thick.spacing_mm[1:]), z, thick.orientation, tuple(origin))


def test_infer_case_zip_to_nifti_and_dicom(tmp_path):
    case = small_synth_case(tmp_path / "in")
    thick = read_series(case)
    expected = expected_thin(thick.volume, 1.0)
    summary = infer_case(case, tmp_path / "thin.nii.gz", linear, WINDOW, 1.0)
    assert {k: summary[k] for k in ("format", "source", "n_thick", "n_thin", "thin_mm")} == {
        "format": "nifti", "source": "dicom", "n_thick": 4, "n_thin": 20, "thin_mm": 1.0}
    image = nib.load(tmp_path / "thin.nii.gz")
    assert image.affine[2, 3] == pytest.approx(thick.volume.z_mm[0] - 2.0)  # 5 -> 1 mm: 2 mm lower
    assert image.header.get_zooms()[2] == pytest.approx(1.0)
    assert_same_image(expected, image)
    assert image.get_fdata().min() <= -1000 and image.get_fdata().max() > 400  # not the window

    infer_case(case, tmp_path / "thin_dicom", linear, WINDOW, 1.0)
    out = read_series(tmp_path / "thin_dicom")
    assert_same_geometry(out.volume, expected)
    np.testing.assert_array_equal(out.volume.hu, expected.hu)
    ds = pydicom.dcmread(tmp_path / "thin_dicom" / "IM00001.dcm")
    assert ds.StudyInstanceUID == thick.header.StudyInstanceUID
    assert ds.PatientName == thick.header.PatientName
    thin_input = read_series(case, "thinnest").header
    assert ds.SeriesInstanceUID not in (thick.header.SeriesInstanceUID, thin_input.SeriesInstanceUID)


@pytest.mark.parametrize("name", ["flipped", "oblique"])
def test_infer_case_dicom_folder_keeps_full_hu_range(tmp_path, rng, name):
    volume = tissue_volume(ORIENTATIONS[name], rng)
    folder = write_dicom_input(tmp_path / "case", volume, rng)
    study = pydicom.dcmread(next(p for p in folder.rglob("*") if p.is_file())).StudyInstanceUID
    infer_case(folder, tmp_path / "out", linear, WINDOW, 1.0)
    files = sorted((tmp_path / "out").iterdir())
    assert len(files) == 20
    normal = normal_of(volume.orientation)
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        assert ds.InstanceNumber == k + 1 and ds.StudyInstanceUID == study
        position = np.array(volume.origin_mm) + (k - 2.0) * normal
        np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient], position, atol=1e-3)
        np.testing.assert_allclose([float(v) for v in ds.ImageOrientationPatient],
                                   volume.orientation, atol=1e-5)
        assert float(ds.SliceThickness) == float(ds.SpacingBetweenSlices) == 1.0
        expected_columns(ds.pixel_array.astype(np.int32) + int(ds.RescaleIntercept))


def test_infer_case_nifti_input(tmp_path, rng):
    volume = tissue_volume(ORIENTATIONS["axial"], rng)
    data = volume.hu.transpose(2, 1, 0)[::-1]  # (x, y, z) with x stored right to left
    affine = np.array([[0.8, 0, 0, 30.0 - 9 * 0.8], [0, -0.7, 0, 20.0], [0, 0, 5.0, -100.0],
                       [0, 0, 0, 1]])  # RAS; the array's y runs to the back
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), tmp_path / "scan.nii.gz")
    source = read_nifti(tmp_path / "scan.nii.gz")

    infer_case(tmp_path / "scan.nii.gz", tmp_path / "thin.nii.gz", linear, WINDOW, 1.0)
    thin = nib.as_closest_canonical(nib.load(tmp_path / "thin.nii.gz"))
    canonical_in = nib.as_closest_canonical(nib.load(tmp_path / "scan.nii.gz"))
    np.testing.assert_allclose(thin.affine[:3, :2], canonical_in.affine[:3, :2])
    assert thin.affine[2, 2] == pytest.approx(1.0)
    np.testing.assert_allclose(thin.affine[:3, 3], canonical_in.affine[:3, 3] + [0, 0, -2.0])
    assert thin.shape == (10, 12, 20)

    infer_case(tmp_path / "scan.nii.gz", tmp_path / "out", linear, WINDOW, 1.0)
    out = read_series(tmp_path / "out")
    assert out.header.PatientName == "ANONYMOUS" and out.header.StudyInstanceUID.is_valid
    assert out.volume.orientation == pytest.approx(source.orientation)
    assert out.volume.spacing_mm == pytest.approx((1.0, 0.7, 0.8))
    np.testing.assert_allclose(out.volume.origin_mm, np.array(source.origin_mm) + [0, 0, -2.0],
                               atol=1e-4)
    expected_columns(out.volume.hu)


def test_infer_case_refusals(tmp_path, rng):
    with pytest.raises(ValueError, match=r"\.nii\.gz path"):  # before the input is even read
        infer_case(tmp_path / "missing.zip", tmp_path / "thin.nrrd", linear, WINDOW, 1.0)
    with pytest.raises(ValueError, match="width"):
        infer_case(tmp_path / "missing.zip", tmp_path / "thin.nii.gz", linear, (40.0, 0.0), 1.0)
    scan = write_nifti(tissue_volume(ORIENTATIONS["axial"], rng), tmp_path / "scan.nii.gz")
    with pytest.raises(CaseError, match="not thicker than 5 mm"):
        infer_case(scan, tmp_path / "thin.nii.gz", linear, WINDOW, 5.0)
    with pytest.raises(ValueError, match=r"predictor returned shape \(4, 12, 10\)"):
        infer_case(scan, tmp_path / "thin.nii.gz", lambda x, a, b: x, WINDOW, 1.0)
    assert not (tmp_path / "thin.nii.gz").exists()


@pytest.mark.parametrize("fmt", ["nifti", "dicom"])
def test_infer_batch_reports_a_broken_case_and_does_the_rest(tmp_path, rng, fmt):
    inputs = tmp_path / "in"
    small_synth_case(inputs)  # in/APE/case_000.zip: a category folder
    write_nifti(tissue_volume(ORIENTATIONS["axial"], rng), inputs / "scan.nii.gz")
    write_dicom_input(inputs / "folder case", tissue_volume(ORIENTATIONS["flipped"], rng), rng,
                      nested=False)
    (inputs / "broken.zip").write_bytes(b"PK\x03\x04 not a zip at all")
    (inputs / "notes.txt").write_text("not a case")
    seen = []
    results = infer_batch(inputs, tmp_path / "out", linear, WINDOW, 1.0, fmt=fmt,
                          progress=seen.append)
    by_id = {r["id"]: r for r in results}
    assert list(by_id) == ["case_000", "broken", "folder_case", "scan"]
    assert by_id["broken"]["status"] == "failed" and by_id["broken"]["reason"] == "corrupt zip"
    assert by_id["broken"]["output"] is None
    assert by_id["case_000"]["category"] == "APE"
    for case_id in ("case_000", "folder_case", "scan"):
        entry = by_id[case_id]
        assert entry["status"] == "ok" and entry["reason"] is None and entry["format"] == fmt
        name = f"{case_id}.nii.gz" if fmt == "nifti" else case_id
        assert entry["output"] == str(tmp_path / "out" / name)
        assert (tmp_path / "out" / name).exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        f"{i}.nii.gz" if fmt == "nifti" else i for i in ("case_000", "folder_case", "scan"))
    assert [(p["done"], p["status"]) for p in seen] == [(1, "ok"), (2, "failed"), (3, "ok"), (4, "ok")]


def test_discover_inputs_refuses_duplicate_ids(tmp_path, rng):
    write_nifti(tissue_volume(ORIENTATIONS["axial"], rng), tmp_path / "scan.nii.gz")
    (tmp_path / "scan.zip").write_bytes(b"")
    with pytest.raises(ValueError, match="two cases have the id 'scan'"):
        discover_inputs(tmp_path)
