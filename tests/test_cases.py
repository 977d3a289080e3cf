from collections import Counter

import pytest

from ctdiff.cases import assign_splits, discover_cases, split_of


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


RATIOS = {"train": 0.8, "val": 0.1, "test": 0.1}


def test_splits_are_deterministic_order_free_and_follow_the_ratios_per_category():
    categories = {f"a{i:03d}": "APE" for i in range(400)} | {f"n{i:03d}": "non-APE" for i in range(200)}
    splits = assign_splits(categories, RATIOS, seed=0)
    reordered = assign_splits(dict(reversed(list(categories.items()))), RATIOS, seed=0)
    assert splits == reordered
    for category, n in (("APE", 400), ("non-APE", 200)):
        counts = Counter(s for i, s in splits.items() if categories[i] == category)
        for name, ratio in RATIOS.items():  # binomial: within 4 standard deviations
            assert abs(counts[name] - ratio * n) <= 4 * (n * ratio * (1 - ratio)) ** 0.5, (category, counts)
    assert assign_splits(categories, RATIOS, seed=1) != splits


def test_a_case_split_depends_on_its_id_alone():
    ids = [f"case_{i:03d}" for i in range(60)]
    alone = {i: split_of(i, RATIOS, seed=3) for i in ids}
    together = assign_splits({i: "x" for i in ids}, RATIOS, seed=3)
    assert together == alone  # 60 cases: every split has cases, nothing is promoted


def test_growing_a_store_from_5_to_60_cases_moves_no_case():
    ids = [f"case_{i:03d}" for i in range(60)]
    recorded: dict[str, str] = {}
    moves = 0
    for n in range(5, 61):
        splits = assign_splits({i: "x" for i in ids[:n]}, RATIOS, seed=0, previous=recorded)
        moves += sum(splits[i] != s for i, s in recorded.items())
        assert {"train", "val", "test"} <= set(splits.values())
        recorded = splits
    assert moves == 0
    # Without the record, the hash alone moves only the cases promoted while the store was small.
    fresh = assign_splits({i: "x" for i in ids}, RATIOS, seed=0)
    assert sum(fresh[i] != s for i, s in recorded.items()) <= 2


def test_removing_cases_moves_no_other_case():
    ids = [f"case_{i:03d}" for i in range(40)]
    full = assign_splits({i: "x" for i in ids}, RATIOS, seed=0)
    fewer = assign_splits({i: "x" for i in ids[::2]}, RATIOS, seed=0, previous=full)
    assert all(fewer[i] == full[i] for i in fewer)


def test_small_datasets_still_get_val_and_test():
    splits = assign_splits({"a": "x", "b": "x", "c": "y"}, RATIOS)
    assert sorted(splits.values()) == ["test", "train", "val"]
