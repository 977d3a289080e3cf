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
from ctdiff.infer import (
    Prediction,
    as_prediction,
    discover_inputs,
    infer_batch,
    infer_case,
    merge_hu,
    uncertainty_hu,
)
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
    assert by_id["broken"]["output"] is None and by_id["broken"]["std_output"] is None
    assert by_id["case_000"]["category"] == "APE"
    for case_id in ("case_000", "folder_case", "scan"):
        entry = by_id[case_id]
        assert entry["status"] == "ok" and entry["reason"] is None and entry["format"] == fmt
        name = f"{case_id}.nii.gz" if fmt == "nifti" else case_id
        assert entry["output"] == str(tmp_path / "out" / name)
        assert entry["std_output"] is None  # the linear predictor gives no std
        assert (tmp_path / "out" / name).exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        f"{i}.nii.gz" if fmt == "nifti" else i for i in ("case_000", "folder_case", "scan"))
    assert [(p["done"], p["status"]) for p in seen] == [(1, "ok"), (2, "failed"), (3, "ok"), (4, "ok")]


def test_discover_inputs_refuses_duplicate_ids(tmp_path, rng):
    write_nifti(tissue_volume(ORIENTATIONS["axial"], rng), tmp_path / "scan.nii.gz")
    (tmp_path / "scan.zip").write_bytes(b"")
    with pytest.raises(ValueError, match="two cases have the id 'scan'"):
        discover_inputs(tmp_path)


# --- The uncertainty map beside the output ---------------------------------------------------

STD = 0.05  # windowed units: 0.05 × 400 HU = 20 HU where the model decides alone


def sampling(std: float):
    """A predictor as a sampler of several samples returns it: (mean, per-voxel std)."""
    def predict(thick_windowed, thick_z_mm, thin_z_mm):
        mean = linear(thick_windowed, thick_z_mm, thin_z_mm)
        return mean, np.full(mean.shape, std, dtype=np.float32)
    return predict


def band_volume(orientation, rng) -> Volume:
    """`tissue_volume` with column 6 at -150 HU, 10 HU inside the window's 40 HU edge band."""
    volume = tissue_volume(orientation, rng)
    volume.hu[:, :, 6] = -150
    return volume


def expected_std_columns(std_hu: np.ndarray) -> None:
    """Air and bone: cubic HU, std 0. Fat and soft tissue: 20 HU. The band column: t = 0.25,
    smoothstep 0.15625, 20 × 0.15625 = 3.1 -> 3."""
    assert np.all(std_hu[..., :4] == 0) and np.all(std_hu[..., 7:] == 0)
    assert np.all(std_hu[..., 4:6] == 20)
    assert np.all(std_hu[..., 6] == 3)


def test_uncertainty_hu_golden_values():
    cubic = np.array([-1100, -1000, -160, -150, -140, -120, 40, 200, 220, 240, 1000], np.float32)
    std = np.full(cubic.shape, STD, np.float32)
    out = uncertainty_hu(std[:, None, None], cubic[:, None, None], *WINDOW)[:, 0, 0]
    # 20 HU × the model's weight in merge_hu (see test_merge_hu_golden_values): 0 outside the
    # window, 0.15625 at -150, 0.5 at -140 and 220, 1 from 40 HU inside either edge.
    np.testing.assert_array_equal(out, [0, 0, 0, 3, 10, 20, 20, 20, 10, 0, 0])
    assert out.dtype == np.int16


def test_as_prediction_takes_an_array_or_mean_and_std():
    mean = np.full((2, 3, 4), 1.5)
    plain = as_prediction(mean, (2, 3, 4))
    assert plain.std is None and plain.mean.dtype == np.float32 and plain.mean.max() == 1.0
    both = as_prediction((mean, np.full((2, 3, 4), 0.1)), (2, 3, 4))
    assert both.std.dtype == np.float32 and both.std.shape == (2, 3, 4)
    assert as_prediction(Prediction(mean, None), (2, 3, 4)).std is None
    with pytest.raises(ValueError, match="tuple of 3"):
        as_prediction((mean, mean, mean), (2, 3, 4))


def test_infer_case_writes_the_std_map_beside_nifti_output(tmp_path, rng):
    scan = write_nifti(band_volume(ORIENTATIONS["axial"], rng), tmp_path / "scan.nii.gz")
    summary = infer_case(scan, tmp_path / "thin.nii.gz", sampling(STD), WINDOW, 1.0)
    assert summary["std_output"] == str(tmp_path / "thin_std.nii.gz")
    thin, std = nib.load(tmp_path / "thin.nii.gz"), nib.load(tmp_path / "thin_std.nii.gz")
    assert std.shape == thin.shape == (10, 12, 20)
    np.testing.assert_array_equal(std.affine, thin.affine)
    np.testing.assert_array_equal(std.header.get_qform(), thin.header.get_qform())
    assert std.get_data_dtype() == np.int16
    expected_std_columns(np.asarray(std.dataobj).transpose(2, 1, 0))  # (D, H, W)
    plain = tmp_path / "plain.nii.gz"  # the mean is what a plain predictor gives
    infer_case(scan, plain, linear, WINDOW, 1.0)
    np.testing.assert_array_equal(np.asarray(thin.dataobj), np.asarray(nib.load(plain).dataobj))


def test_infer_case_writes_the_std_series_beside_dicom_output(tmp_path, rng):
    folder = write_dicom_input(tmp_path / "case", band_volume(ORIENTATIONS["oblique"], rng), rng)
    summary = infer_case(folder, tmp_path / "out", sampling(STD), WINDOW, 1.0)
    assert summary["std_output"] == str(tmp_path / "out_std")
    thin = [pydicom.dcmread(p) for p in sorted((tmp_path / "out").iterdir())]
    std = [pydicom.dcmread(p) for p in sorted((tmp_path / "out_std").iterdir())]
    assert len(std) == len(thin) == 20
    for a, b in zip(thin, std):
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
                        "SliceThickness", "SpacingBetweenSlices", "StudyInstanceUID",
                        "FrameOfReferenceUID", "InstanceNumber"):
            assert b[keyword].value == a[keyword].value, keyword
        assert b.SeriesInstanceUID != a.SeriesInstanceUID and b.SOPInstanceUID != a.SOPInstanceUID
        assert b.SeriesDescription == "ctdiff thin uncertainty (std, HU)"
        assert list(b.ImageType)[0] == "DERIVED" and b.SeriesNumber == a.SeriesNumber + 1
        expected_std_columns(b.pixel_array.astype(np.int32) + int(b.RescaleIntercept))
    assert len({ds.SeriesInstanceUID for ds in std}) == 1


@pytest.mark.parametrize("name", ["thin.nii.gz", "out"])
def test_plain_predictor_writes_no_std_and_removes_an_earlier_one(tmp_path, rng, name):
    scan = write_nifti(band_volume(ORIENTATIONS["axial"], rng), tmp_path / "scan.nii.gz")
    std_name = "thin_std.nii.gz" if name.endswith(".gz") else "out_std"
    infer_case(scan, tmp_path / name, sampling(STD), WINDOW, 1.0)
    assert (tmp_path / std_name).exists()
    summary = infer_case(scan, tmp_path / name, linear, WINDOW, 1.0)
    assert summary["std_output"] is None
    assert not (tmp_path / std_name).exists()  # it described the earlier output, not this one
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["scan.nii.gz", name])


@pytest.mark.parametrize("bad, message", [
    (lambda mean: np.full(mean.shape, -0.01, np.float32), "negative std"),
    (lambda mean: np.zeros(mean.shape[1:], np.float32), r"std of shape \(12, 10\)"),
    (lambda mean: np.where(mean > 0.5, np.nan, 0.1), "std with NaN"),
], ids=["negative", "shape", "nan"])
def test_infer_case_refuses_a_bad_std(tmp_path, rng, bad, message):
    scan = write_nifti(band_volume(ORIENTATIONS["axial"], rng), tmp_path / "scan.nii.gz")

    def predict(thick_windowed, thick_z_mm, thin_z_mm):
        mean = linear(thick_windowed, thick_z_mm, thin_z_mm)
        return mean, bad(mean)

    with pytest.raises(ValueError, match=message):
        infer_case(scan, tmp_path / "thin.nii.gz", predict, WINDOW, 1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.nii.gz"]  # nothing written


def test_infer_case_refuses_a_foreign_std_sibling_before_any_work(tmp_path):
    (tmp_path / "out_std").mkdir()
    (tmp_path / "out_std" / "notes.txt").write_text("mine")
    # The input does not exist: the refusal must come before it is read.
    with pytest.raises(ValueError, match="'out_std', where the uncertainty map goes: .*other files"):
        infer_case(tmp_path / "missing.zip", tmp_path / "out", sampling(STD), WINDOW, 1.0)
    (tmp_path / "scan_std").write_text("a file")
    with pytest.raises(ValueError, match="'scan_std', .* is a file"):
        infer_case(tmp_path / "missing.zip", tmp_path / "scan", linear, WINDOW, 1.0)
    assert (tmp_path / "out_std" / "notes.txt").read_text() == "mine"


def test_infer_batch_writes_std_maps_and_refuses_clashing_ids(tmp_path, rng):
    inputs = tmp_path / "in"
    write_nifti(band_volume(ORIENTATIONS["axial"], rng), inputs / "scan.nii.gz")
    [entry] = infer_batch(inputs, tmp_path / "out", sampling(STD), WINDOW, 1.0)
    assert entry["status"] == "ok" and entry["std_output"] == str(tmp_path / "out" / "scan_std.nii.gz")
    expected_std_columns(np.asarray(nib.load(entry["std_output"]).dataobj).transpose(2, 1, 0))

    write_nifti(band_volume(ORIENTATIONS["axial"], rng), inputs / "scan_std.nii.gz")
    with pytest.raises(ValueError, match="case 'scan_std' is where the uncertainty map of case 'scan'"):
        infer_batch(inputs, tmp_path / "again", sampling(STD), WINDOW, 1.0, fmt="dicom")
    assert not (tmp_path / "again").exists()


def test_infer_case_resizes_the_input_to_the_models_resolution(tmp_path):
    """A model trained at preprocess.resolution=R sees its input resized as preprocessing
    resized its training cases: same field of view, R x R pixels."""
    from ctdiff.preprocess import resize_inplane

    case = small_synth_case(tmp_path / "in")
    thick = read_series(case).volume
    size = thick.shape[1] // 2
    summary = infer_case(case, tmp_path / "thin.nii.gz", linear, WINDOW, 1.0, resolution=size)
    assert summary["resized_from"] == list(thick.shape[1:])
    out = read_nifti(tmp_path / "thin.nii.gz")
    assert_same_geometry(out, expected_thin(resize_inplane(thick, size), 1.0))
    assert out.spacing_mm[1:] == pytest.approx((2 * thick.spacing_mm[1], 2 * thick.spacing_mm[2]))
    same = infer_case(case, tmp_path / "same.nii.gz", linear, WINDOW, 1.0, resolution=thick.shape[1])
    assert same["resized_from"] is None
