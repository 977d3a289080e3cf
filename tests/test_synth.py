"""The chest phantom and the synthetic DICOM ZIPs: geometry, values, headers, compression."""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    XRayRadiationDoseSRStorage,
)

from ctdiff.phantom import HU_AIR, HU_BONE, HU_LUNG, chest_phantom
from ctdiff.synth import PHI_MARKERS, SynthSpec, case_phi, phantom_pair, synthesize, write_case

SMALL = dict(n_cases=1, size=32, n_thin=20, noise_hu=12.0)  # 26 thin, 4 thick slices


def _phantom(seed: int, **kw) -> np.ndarray:
    return chest_phantom(24, 48, 350.0 / 48, 1.0, np.random.default_rng(seed), **kw)


def _read_zip(path: Path) -> list[tuple[str, bytes, pydicom.Dataset]]:
    with zipfile.ZipFile(path) as zf:
        return [(n, zf.read(n), pydicom.dcmread(io.BytesIO(zf.read(n)))) for n in zf.namelist()]


def _axial(datasets: list[pydicom.Dataset], thickness: float) -> tuple[np.ndarray, np.ndarray]:
    """(HU (D, H, W) float, z (D,)) of one axial series, head first, rescale applied."""
    sl = [d for d in datasets if "AXIAL" in d.get("ImageType", [])]
    sl = [d for d in sl if d.SliceThickness == thickness]
    sl.sort(key=lambda d: -float(d.ImagePositionPatient[2]))
    hu = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in sl])
    return hu, np.array([float(d.ImagePositionPatient[2]) for d in sl])


# --- phantom -------------------------------------------------------------------------------


def test_phantom_is_deterministic_and_holds_every_tissue():
    a, b, other = _phantom(0), _phantom(0), _phantom(1)
    assert a.shape == (24, 48, 48) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - other).mean() > 5.0
    assert a[:, 0, 0].tolist() == [HU_AIR] * 24  # corners are air
    assert a.min() == HU_AIR and a.max() == pytest.approx(HU_BONE, abs=1e-3)
    assert (np.abs(a - HU_LUNG) < 1).mean() > 0.05  # lungs
    assert ((a > 250) & (a < 450)).mean() > 0.005  # contrast-filled vessels
    assert (np.abs(a - HU_BONE) < 1).mean() > 0.001  # bone


def test_phantom_scales_with_pixel_size():
    """The same seed gives the same chest on a finer grid: 2x2-pixel means match closely."""
    coarse = chest_phantom(4, 32, 10.0, 2.0, np.random.default_rng(3))
    fine = chest_phantom(4, 64, 5.0, 2.0, np.random.default_rng(3))
    pooled = fine.reshape(4, 32, 2, 32, 2).mean(axis=(2, 4))
    assert np.abs(pooled - coarse).mean() < 25.0
    assert np.abs(pooled - coarse).mean() < 0.1 * np.abs(coarse - coarse.mean()).mean()


def test_emboli_only_darken_vessels():
    changed = 0
    for seed in range(4):
        plain, ape = _phantom(seed), _phantom(seed, emboli=True)
        diff = ape - plain
        assert diff.max() == 0.0  # clot only replaces contrast
        assert np.all(plain[diff < 0] > -800)  # ... where there was a vessel, never pure lung
        changed += int((diff < -50).sum())
    assert changed > 20


def test_phantom_rejects_bad_grid():
    with pytest.raises(ValueError):
        chest_phantom(0, 32, 1.0, 1.0, np.random.default_rng(0))


# --- geometry and values -------------------------------------------------------------------


def test_geometry_follows_the_documented_rules():
    spec = SynthSpec(**SMALL)
    thin, thick, geo = phantom_pair(spec, 0)
    assert thin.shape == (26, 32, 32) and thick.shape == (4, 32, 32)
    assert thin.dtype == thick.dtype == np.float32
    np.testing.assert_allclose(np.diff(geo.thin_z_mm), -1.0)  # head to feet
    np.testing.assert_allclose(np.diff(geo.thick_z_mm), -5.0)
    assert geo.covered == slice(3, 23) and geo.slab(1) == slice(8, 13)
    for k in range(4):
        assert geo.thick_z_mm[k] == pytest.approx(geo.thin_z_mm[geo.slab(k)].mean())
    # The thick slab extent is exactly the extent of the covered thin slices.
    assert geo.thick_z_mm[0] + 2.5 == pytest.approx(geo.thin_z_mm[3] + 0.5)
    assert geo.thick_z_mm[-1] - 2.5 == pytest.approx(geo.thin_z_mm[22] - 0.5)
    assert geo.origin_xy_mm == pytest.approx((-31 / 2 * 350 / 32,) * 2)


def test_thick_is_the_slab_mean_of_thin():
    spec = SynthSpec(**{**SMALL, "noise_hu": 0.0})
    thin, thick, geo = phantom_pair(spec, 0)
    fov = thin[0] != -2048
    assert 0 < (~fov).sum() < 0.25 * fov.size  # only the corners are outside the circle
    assert np.all(thick[:, ~fov] == -1024)
    for k in range(len(thick)):
        slab_mean = thin[geo.slab(k)].mean(axis=0)
        # Each side is rounded to whole HU once: at most 0.5 + 0.5 apart.
        assert np.abs(thick[k][fov] - slab_mean[fov]).max() <= 1.0
    assert thick.std() > 200  # and it is a real image, not a constant
    assert np.all(thin == np.rint(thin))


def test_noise_levels_and_determinism():
    spec = SynthSpec(**SMALL)
    thin, thick, geo = phantom_pair(spec, 0)
    again = phantom_pair(spec, 0)
    np.testing.assert_array_equal(thin, again[0])
    np.testing.assert_array_equal(thick, again[1])
    clean_thin, clean_thick, _ = phantom_pair(SynthSpec(**{**SMALL, "noise_hu": 0.0}), 0)
    fov = thin[0] != -2048
    body = (clean_thin > -900) & (clean_thin < 2000) & fov  # away from the -1024 clip
    assert (thin - clean_thin)[body].std() == pytest.approx(12.0, rel=0.08)
    body_thick = (clean_thick > -900) & fov
    assert (thick - clean_thick)[body_thick].std() == pytest.approx(12.0 / np.sqrt(5), rel=0.12)
    other = phantom_pair(SynthSpec(**{**SMALL, "seed": 1}), 0)[0]
    assert np.abs(other - thin)[:, fov].mean() > 20.0


def test_spec_rejects_what_cannot_be_built():
    for bad in (
        dict(compression="lzw"),
        dict(thick_mm=2.5, thin_mm=1.0),
        dict(n_thin=22),
        dict(categories=()),
        dict(compression="jpeg2000", size=16),
    ):
        with pytest.raises(ValueError):
            SynthSpec(**bad)


# --- DICOM ZIPs ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain_zip(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    return write_case(out, SynthSpec(**SMALL), 0)


def test_synthesize_writes_category_folders(tmp_path):
    spec = SynthSpec(**{**SMALL, "n_cases": 3, "size": 16, "n_thin": 5})
    paths = synthesize(tmp_path, spec)
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == [
        "APE/case_000.zip", "non-APE/case_001.zip", "APE/case_002.zip"
    ]
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(
        ["APE", "non-APE", "case_000.zip", "case_001.zip", "case_002.zip"]
    )  # no temp files left
    again = synthesize(tmp_path / "again", spec)
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]


def test_zip_members_are_anonymous_and_complete(plain_zip):
    members = _read_zip(plain_zip)
    assert len(members) == 26 + 4 + 1 + 1
    names = [n for n, _, _ in members]
    assert all(re.fullmatch(r"DICOM/[0-9A-F]{8}/[0-9A-F]{8}/[0-9A-F]{12}", n) for n in names)
    assert len({n.rsplit("/", 1)[0] for n in names}) > 1  # spread over nested folders
    datasets = [d for _, _, d in members]
    thin_order = [int(d.InstanceNumber) for d in datasets if d.get("SliceThickness") == 1.0]
    assert thin_order != sorted(thin_order)  # shuffled
    assert len({d.SeriesInstanceUID for d in datasets}) == 4
    assert len({d.StudyInstanceUID for d in datasets}) == 1
    assert len({d.SOPInstanceUID for d in datasets}) == 32
    scouts = [d for d in datasets if "LOCALIZER" in d.get("ImageType", [])]
    assert len(scouts) == 1
    assert [float(v) for v in scouts[0].ImageOrientationPatient] == [1, 0, 0, 0, 0, -1]
    srs = [d for d in datasets if d.SOPClassUID == XRayRadiationDoseSRStorage]
    assert len(srs) == 1 and "PixelData" not in srs[0] and srs[0].Modality == "SR"


def test_headers_geometry_and_values_read_back(plain_zip):
    spec = SynthSpec(**SMALL)
    thin, thick, geo = phantom_pair(spec, 0)
    datasets = [d for _, _, d in _read_zip(plain_zip)]
    images = [d for d in datasets if "AXIAL" in d.get("ImageType", [])]
    assert {d.SOPClassUID for d in images} == {CTImageStorage}
    assert len({d.FrameOfReferenceUID for d in images}) == 1
    for d in images:
        assert d.Modality == "CT" and list(d.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
        assert d.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert [float(v) for v in d.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert [float(v) for v in d.PixelSpacing] == [10.9375, 10.9375]
        assert [float(v) for v in d.ImagePositionPatient[:2]] == [-169.53125, -169.53125]
        assert (d.Rows, d.Columns, d.BitsAllocated) == (32, 32, 16)
    thin_ds = [d for d in images if float(d.SliceThickness) == 1.0]
    thick_ds = [d for d in images if float(d.SliceThickness) == 5.0]
    assert {(d.PixelRepresentation, float(d.RescaleIntercept)) for d in thin_ds} == {(1, 0.0)}
    assert {(d.PixelRepresentation, float(d.RescaleIntercept)) for d in thick_ds} == {(0, -1024.0)}
    assert {d.PixelPaddingValue for d in thin_ds} == {-2048}
    assert thick_ds[0].pixel_array.dtype == np.uint16 and thick_ds[0].pixel_array.min() == 0

    thin_hu, thin_z = _axial(datasets, 1.0)
    thick_hu, thick_z = _axial(datasets, 5.0)
    np.testing.assert_allclose(thin_z, geo.thin_z_mm)
    np.testing.assert_allclose(thick_z, geo.thick_z_mm)
    np.testing.assert_array_equal(thin_hu, thin)
    np.testing.assert_array_equal(thick_hu, thick)
    # InstanceNumber counts from the head.
    by_instance = sorted(thin_ds, key=lambda d: int(d.InstanceNumber))
    assert float(by_instance[0].ImagePositionPatient[2]) == geo.thin_z_mm.max()


def test_fake_patient_data_is_in_every_file(plain_zip):
    phi = case_phi(0)
    assert phi["AccessionNumber"] == "ACC000" and phi["PatientName"] == "SYNTH^PATIENT^000"
    for _, raw, ds in _read_zip(plain_zip):
        assert all(marker.encode() in raw for marker in PHI_MARKERS)
        assert str(ds.PatientName) == "SYNTH^PATIENT^000"
        assert (ds.PatientID, ds.AccessionNumber) == ("SYNTHID000", "ACC000")
        assert ds.InstitutionName == "Synthetic General Hospital"
        assert ds.PatientBirthDate == "19700101"


@pytest.mark.parametrize(
    "compression, syntax",
    [("deflate", DeflatedExplicitVRLittleEndian), ("rle", RLELossless),
     ("jpeg2000", JPEG2000Lossless)],
)
def test_compression_is_lossless(tmp_path, plain_zip, compression, syntax):
    path = write_case(tmp_path, SynthSpec(**{**SMALL, "compression": compression}), 0)
    datasets = [d for _, _, d in _read_zip(path)]
    reference = [d for _, _, d in _read_zip(plain_zip)]
    images = [d for d in datasets if "PixelData" in d]
    assert len(images) == 31 and {d.file_meta.TransferSyntaxUID for d in images} == {syntax}
    for thickness in (1.0, 5.0):
        hu, z = _axial(datasets, thickness)
        ref_hu, ref_z = _axial(reference, thickness)
        np.testing.assert_array_equal(z, ref_z)
        np.testing.assert_array_equal(hu, ref_hu)
    assert hu.min() < -900 and hu.max() > 500  # the values compared are a real chest
