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
from scipy import ndimage

from ctdiff import phantom
from ctdiff.interpolate import interpolate_z
from ctdiff.phantom import (
    HU_AIR,
    HU_BONE,
    HU_CANCELLOUS,
    HU_DISC,
    HU_GROUND_GLASS,
    HU_LUNG,
    HU_NODULE,
    chest_phantom,
)
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


def test_phantom_is_the_same_chest_at_any_slice_spacing():
    """Anatomy is in mm along z too: 2 mm slices are every other 1 mm slice, up to the
    partial-volume ramps, which are a voxel wide."""
    for seed in range(2):
        thin = chest_phantom(25, 64, 350 / 64, 1.0, np.random.default_rng(seed))
        thick = chest_phantom(13, 64, 350 / 64, 2.0, np.random.default_rng(seed))
        other = chest_phantom(13, 64, 350 / 64, 2.0, np.random.default_rng(seed + 10))
        assert np.abs(thin[::2] - thick).mean() < 2.0  # measured 0.5
        assert np.abs(thin[::2] - other).mean() > 20.0


def _small_sections(vol: np.ndarray, pixel_mm: float) -> list[tuple]:
    """Per slice: (labels, label ids, centroid x mm, centroid y mm, area mm2) of the bright
    (> -400 HU) sections of at most 300 mm2, which in a chest are vessels and nodules in lung."""
    out = []
    for sl in vol:
        labels, n = ndimage.label(sl > -400)
        ids = np.arange(1, n + 1)
        area = ndimage.sum_labels(np.ones_like(sl), labels, ids) * pixel_mm**2
        ids = ids[area <= 300.0]
        labels = np.where(np.isin(labels, ids), labels, 0)
        centroids = ndimage.center_of_mass(np.ones_like(sl), labels, ids)
        rows, cols = np.array(centroids).reshape(-1, 2).T
        centre = (len(sl) - 1) / 2
        out.append((labels, ids, (cols - centre) * pixel_mm, (rows - centre) * pixel_mm,
                    area[ids - 1]))
    return out


def test_pulmonary_vessels_are_many_small_oblique_and_taper():
    """Both lungs hold many small vessel sections per slice; a vessel's section moves in-plane
    from one 1 mm slice to the next (it crosses them obliquely); sections shrink outwards."""
    pixel_mm, n_slices = 350 / 256, 30
    x, area, shifts = [], [], []
    for seed in range(3):
        vol = chest_phantom(n_slices, 256, pixel_mm, 1.0, np.random.default_rng(seed))
        sections = _small_sections(vol, pixel_mm)
        x += [s[2] for s in sections]
        area += [s[4] for s in sections]
        for (a, ids_a, xa, ya, area_a), (b, ids_b, xb, yb, area_b) in zip(sections, sections[1:]):
            both = (a > 0) & (b > 0)
            for i, j in np.unique(np.stack([a[both], b[both]]), axis=1).T:  # overlapping sections
                p, q = np.searchsorted(ids_a, i), np.searchsorted(ids_b, j)
                if max(area_a[p], area_b[q]) <= 30.0:
                    shifts.append(np.hypot(xa[p] - xb[q], ya[p] - yb[q]))
    x, area = np.concatenate(x), np.concatenate(area)
    small = area <= 30.0  # up to about 6 mm across
    per_lung_slice = np.array([(small & (x < 0)).sum(), (small & (x > 0)).sum()]) / (3 * n_slices)
    assert np.all(per_lung_slice > 7)  # measured 9-10; 4-6 with the phantom before the trees
    assert area[np.abs(x) < 70].mean() > 3 * area[np.abs(x) > 90].mean()  # hila vs periphery
    # Vessels mostly along z move ~0.5 mm (the phantom before the trees); these ~1 mm.
    assert np.median(shifts) > 0.75


def _chest(seed: int) -> phantom._Chest:
    """A typical chest, the lungs' centre up to 40 mm from z = 0."""
    rng = np.random.default_rng(seed)
    return phantom._Chest(160.0, 112.0, 12.0, rng.uniform(-40.0, 40.0), 155.0,
                          phantom._curve(rng, 8.0, (40.0, 150.0)))


def test_nodules_are_4_to_10_of_3_to_8_mm_in_the_scanned_lungs():
    """Placed well inside a lung (not in the heart) and in the scanned z range; some part-solid."""
    z = np.arange(30.0, -30.5, -1.0)
    found = []
    for seed in range(20):
        chest = _chest(seed)
        nodules = phantom._nodules(chest, z, np.random.default_rng(seed))
        assert 4 <= len(nodules) <= 10
        centres = np.array([n.centre_mm for n in nodules])
        assert np.all(phantom._in_lungs(chest, centres)) and np.all(np.abs(centres[:, 2]) <= 30)
        found += nodules
    diameters = 2 * np.array([n.radius_mm for n in found])
    assert 3.0 <= diameters.min() and diameters.max() <= 8.0 and diameters.std() > 1.0
    part_solid = np.array([n.core_fraction < 1.0 for n in found])
    assert 0.1 < part_solid.mean() < 0.4


@pytest.mark.parametrize("pixel_mm, slice_mm", [(0.25, 0.25), (0.7, 1.0), (2.0, 1.0), (5.0, 2.0)])
def test_small_objects_hold_the_same_amount_on_any_grid(pixel_mm, slice_mm):
    """A 4 mm part-solid nodule and a 2 mm oblique vessel in lung: the HU they add, summed over
    the volume, is their true size on fine and coarse grids alike (a one-voxel ramp around the
    true radius adds 1.3-2.5x on the coarse ones), and fine grids show their values."""
    n, d = int(np.ceil(60 / pixel_mm)), int(np.ceil(60 / slice_mm))
    x = ((np.arange(n) - (n - 1) / 2) * pixel_mm).astype(np.float32)
    z = (((d - 1) / 2 - np.arange(d)) * slice_mm).astype(np.float32)
    grid = phantom._Grid(x, x.copy(), z, pixel_mm, slice_mm)
    voxel_mm3 = pixel_mm**2 * slice_mm

    vol = np.full((d, n, n), HU_LUNG, dtype=np.float32)
    phantom._draw_nodule(vol, grid, phantom._Nodule((0.3, -0.2, 0.1), 2.0, 0.5))
    ball = 4 / 3 * np.pi * np.array([1.0, 2.0**3 - 1.0])  # core, rim (mm3)
    expected = ball @ [HU_NODULE - HU_LUNG, HU_GROUND_GLASS - HU_LUNG]
    assert (vol - HU_LUNG).sum() * voxel_mm3 == pytest.approx(expected, rel=0.15)
    if pixel_mm < 1:
        assert vol.max() == pytest.approx(HU_NODULE)  # the solid core
    if pixel_mm < 0.5:
        assert np.isclose(vol, HU_GROUND_GLASS, atol=1.0).sum() * voxel_mm3 > 0.5 * ball[1]

    vol = np.full((d, n, n), HU_LUNG, dtype=np.float32)
    p0, p1 = np.array([[-10.0, -3.0, -8.0]]), np.array([[10.0, 5.0, 9.0]])
    segs = phantom._Segments(p0, p1, np.array([1.0]), np.array([1.0]), phantom.HU_CONTRAST)
    phantom._draw_segments(vol, segs, grid, lung_only=True)
    expected = (phantom.HU_CONTRAST - HU_LUNG) * np.pi * (np.linalg.norm(p1 - p0) + 4 / 3)
    assert (vol - HU_LUNG).sum() * voxel_mm3 == pytest.approx(expected, rel=0.15)


def test_ribs_cut_every_slice_obliquely():
    """3-4 ribs per side in every slice, and which pixels are rib changes along z."""
    pixel_mm = 350 / 128
    vol = chest_phantom(40, 128, pixel_mm, 1.0, np.random.default_rng(0))
    x = (np.arange(128) - 63.5) * pixel_mm
    bone = (vol > 400) & (np.abs(x) > 40)[None, None, :]  # lateral to spine and sternum
    sections = [ndimage.label(sl)[1] for sl in bone]
    assert min(sections) >= 6  # the phantom before had 2 in some slices
    changed = (bone[1:] != bone[:-1]).sum((1, 2)) / bone[:-1].sum((1, 2))
    assert changed.min() > 0.1  # per mm


def test_vertebrae_have_discs_and_endplates():
    """Along the spine's axis: discs 4-8 mm thick one vertebral level (25-30 mm) apart, each
    between cortical endplates, with cancellous bone in between."""
    pixel_mm = 350 / 128
    for seed in range(3):
        vol = chest_phantom(90, 128, pixel_mm, 1.0, np.random.default_rng(seed))
        midline = vol[:, 64:, 64]  # (D, rows behind the centre)
        body = np.nonzero(np.abs(np.median(midline, axis=0) - HU_CANCELLOUS) < 50)[0]
        profile = midline[:, body[len(body) // 2]]
        disc = profile < (HU_DISC + HU_CANCELLOUS) / 2
        runs = np.split(np.arange(len(profile)), np.flatnonzero(np.diff(disc)) + 1)
        discs = [r for r in runs if disc[r[0]] and 0 < r[0] and r[-1] < len(profile) - 1]
        assert len(discs) >= 2
        assert all(4 <= len(r) <= 8 for r in discs)
        spacing = np.diff([r.mean() for r in discs])
        assert np.all((spacing >= 25) & (spacing <= 30))
        for r in discs:  # an endplate within 2 mm above and below
            assert profile[r[0] - 2 : r[0]].max() > 450
            assert profile[r[-1] + 1 : r[-1] + 3].max() > 450


def test_thick_slabs_blur_what_thin_slices_show():
    """Golden-ish: cubic interpolation from the 5 mm slabs misses the 1 mm detail between slab
    centres. In-between PSNR (window 40/400) over cases 0-5 was 31.1 dB with the phantom before
    the vessel trees, nodules, oblique ribs and endplates; it is 28.8 dB now."""
    def window(hu: np.ndarray) -> np.ndarray:  # center 40, width 400, to [0, 1]
        return np.clip((hu + 160.0) / 400.0, 0.0, 1.0)

    spec = SynthSpec(size=64, n_thin=40, noise_hu=0.0)
    psnrs = []
    for case in range(6):
        thin, thick, geo = phantom_pair(spec, case)
        truth = window(thin[geo.covered])
        # z descends head first; interpolate_z wants it ascending.
        cubic = interpolate_z(window(thick)[::-1], geo.thick_z_mm[::-1],
                              geo.thin_z_mm[geo.covered][::-1], "cubic")[::-1]
        centres = [geo.slab(k).start + geo.ratio // 2 - geo.covered.start
                   for k in range(len(thick))]
        between = np.setdiff1d(np.arange(len(truth)), centres)
        psnrs.append(-10 * np.log10(np.mean((cubic[between] - truth[between]) ** 2)))
    assert 25.0 < np.mean(psnrs) < 30.0


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
