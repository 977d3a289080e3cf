from collections import Counter

import pytest

from ctdiff.cases import assign_splits, discover_cases


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")


def test_discover_categories_zips_and_folders(tmp_path):
    _touch(tmp_path / "APE" / "case_001.zip")
    _touch(tmp_path / "APE" / "case 002.zip")
    _touch(tmp_path / "non-APE" / "case_003" / "DICOM" / "a1")  # unzipped case in a category
    _touch(tmp_path / "loose.zip")
    _touch(tmp_path / "unzipped" / "IM0001")  # a case folder at top level
    refs = {r.id: r for r in discover_cases(tmp_path)}
    assert set(refs) == {"case_001", "case_002", "case_003", "loose", "unzipped"}
    assert refs["case_001"].category == "APE"
    assert refs["case_003"].category == "non-APE"
    assert refs["loose"].category == "uncategorized"
    assert refs["unzipped"].category == "uncategorized"


def test_duplicate_ids_are_refused(tmp_path):
    _touch(tmp_path / "APE" / "case_001.zip")
    _touch(tmp_path / "non-APE" / "case_001.zip")
    with pytest.raises(ValueError, match="case_001"):
        discover_cases(tmp_path)


def test_splits_are_stratified_deterministic_and_order_free():
    categories = {f"a{i:02d}": "APE" for i in range(20)} | {f"n{i:02d}": "non-APE" for i in range(10)}
    ratios = {"train": 0.8, "val": 0.1, "test": 0.1}
    splits = assign_splits(categories, ratios, seed=0)
    reordered = assign_splits(dict(reversed(list(categories.items()))), ratios, seed=0)
    assert splits == reordered
    per = Counter((categories[i], s) for i, s in splits.items())
    assert per[("APE", "train")] == 16 and per[("APE", "val")] == 2 and per[("APE", "test")] == 2
    assert per[("non-APE", "train")] == 8 and per[("non-APE", "val")] == 1 and per[("non-APE", "test")] == 1
    assert assign_splits(categories, ratios, seed=1) != splits


def test_small_datasets_still_get_val_and_test():
    splits = assign_splits({"a": "x", "b": "x", "c": "y"}, {"train": 0.8, "val": 0.1, "test": 0.1})
    assert sorted(splits.values()) == ["test", "train", "val"]
