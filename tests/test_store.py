import numpy as np
import pytest

from ctdiff.store import CaseStore
from ctdiff.volume import Volume


def _volume(depth=12, size=16, dz=1.0, seed=0, z0=-30.0):
    rng = np.random.default_rng(seed)
    hu = rng.integers(-1024, 2000, size=(depth, size, size)).astype(np.int16)
    return Volume(
        hu=hu,
        spacing_mm=(dz, 0.7, 0.7),
        z_mm=z0 + dz * np.arange(depth),
        orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        origin_mm=(-5.0, -5.0, z0),
    )


def _entry(case_id, status="ok", reason=None):
    return {"id": case_id, "status": status, "reason": reason, "category": "APE", "n_thick": 3, "n_thin": 12}


def test_round_trip_is_lossless_with_geometry(tmp_path):
    store = CaseStore(tmp_path / "s.zarr")
    store.create()
    thin, thick = _volume(), _volume(depth=3, dz=5.0, seed=1, z0=-28.0)
    store.write_native("c1", {"thick": thick, "thin": thin}, "k-native", {}, chunk_slices=4, level=3)
    store.write_case("c1", {}, "k-case", _entry("c1"), chunk_slices=4, level=3)
    read = store.read("c1", "thin")
    np.testing.assert_array_equal(read.hu, thin.hu)
    assert read.hu.dtype == np.int16
    assert read.spacing_mm == thin.spacing_mm
    np.testing.assert_allclose(read.z_mm, thin.z_mm)
    assert read.origin_mm == thin.origin_mm
    slab = store.read("c1", "thin", slice(4, 8))
    np.testing.assert_array_equal(slab.hu, thin.hu[4:8])
    assert slab.origin_mm[2] == pytest.approx(-26.0)
    assert store.case_key("c1") == "k-case" and store.native_key("c1") == "k-native"


def test_resized_arrays_shadow_native_ones(tmp_path):
    store = CaseStore(tmp_path / "s.zarr")
    store.create()
    native = _volume(size=16)
    small = _volume(size=8, seed=3)
    store.write_native("c1", {"thick": native, "thin": native}, "n", {}, 4, 3)
    store.write_case("c1", {"thick": small, "thin": small}, "c", _entry("c1"), 4, 3)
    assert store.read("c1", "thick").shape == (12, 8, 8)
    assert store.read_native("c1", "thick").shape == (12, 16, 16)


def test_manifest_lists_ok_and_quarantined_with_splits(tmp_path):
    store = CaseStore(tmp_path / "s.zarr")
    store.create()
    vol = _volume()
    store.write_native("b", {"thick": vol, "thin": vol}, "n", {}, 4, 3)
    store.write_case("b", {}, "c", _entry("b"), 4, 3)
    store.write_case("a", {}, "", _entry("a", "quarantined", "corrupt zip"), 4, 3)
    store.set_splits({"b": "train"})
    manifest = store.manifest()
    assert [e["id"] for e in manifest] == ["a", "b"]
    assert manifest[0]["status"] == "quarantined" and manifest[0]["reason"] == "corrupt zip"
    assert manifest[1]["split"] == "train" and manifest[0]["split"] is None
    assert store.ids() == ["b"] and store.ids(split="train") == ["b"]
    with pytest.raises(KeyError):
        store.read("a", "thin")


def test_half_written_case_is_invisible_and_cleared(tmp_path):
    store = CaseStore(tmp_path / "s.zarr")
    store.create()
    staging = tmp_path / "s.zarr" / ".staging" / "cases-c1-deadbeef"
    staging.mkdir(parents=True)
    (staging / "zarr.json").write_text("{}")
    assert store.manifest() == [] and store.case_key("c1") is None
    store.create()  # a new run clears what a killed writer left
    assert not staging.exists()


def test_rewrite_replaces_a_case(tmp_path):
    store = CaseStore(tmp_path / "s.zarr")
    store.create()
    first, second = _volume(seed=1), _volume(seed=2)
    store.write_native("c", {"thick": first, "thin": first}, "k1", {}, 4, 3)
    store.write_native("c", {"thick": second, "thin": second}, "k2", {}, 4, 3)
    np.testing.assert_array_equal(store.read_native("c", "thin").hu, second.hu)
    assert store.native_key("c") == "k2"
    assert not list((tmp_path / "s.zarr" / ".staging").glob("*"))


def test_splits_are_recorded_with_the_settings_they_were_assigned_with(tmp_path):
    store = CaseStore(tmp_path / "s.zarr")
    store.create()
    settings = {"seed": 0, "ratios": {"train": 0.8, "val": 0.1, "test": 0.1}}
    store.set_splits({"a": "train", "b": "test"}, settings)
    assert CaseStore(tmp_path / "s.zarr").splits(settings) == {"a": "train", "b": "test"}
    assert store.splits({**settings, "seed": 1}) == {}  # other settings: nothing to keep
    assert store.splits() == {"a": "train", "b": "test"}
