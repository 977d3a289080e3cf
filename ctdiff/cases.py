"""Finding cases in an input folder, and assigning them to train/val/test splits."""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass
from pathlib import Path

UNCATEGORIZED = "uncategorized"


@dataclass(frozen=True)
class CaseRef:
    """A case on disk: its id (from the file name), where it is, and its category folder."""

    id: str
    path: str
    category: str

    def to_dict(self) -> dict:
        return asdict(self)


def _case_id(name: str) -> str:
    stem = name[: -len(".zip")] if name.lower().endswith(".zip") else name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "case"


def _is_case_folder(folder: Path) -> bool:
    # A folder of DICOM files (at any depth) rather than a folder of cases: it holds no ZIPs.
    return not any(p.suffix.lower() == ".zip" for p in folder.iterdir())


def discover_cases(input_dir: str | Path) -> list[CaseRef]:
    """`<input>/<case>.zip`, `<input>/<category>/<case>.zip` or unzipped case folders.

    A top-level folder that holds ZIPs or sub-folders only is a category; a folder that holds
    files directly is an unzipped case. Ids must be unique across categories.
    """
    input_dir = Path(input_dir)
    refs: list[CaseRef] = []

    def add(path: Path, category: str) -> None:
        refs.append(CaseRef(id=_case_id(path.name), path=str(path.resolve()), category=category))

    for entry in sorted(input_dir.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.suffix.lower() == ".zip":
            add(entry, UNCATEGORIZED)
        elif entry.is_dir():
            has_files = any(p.is_file() and p.suffix.lower() != ".zip" for p in entry.iterdir())
            if has_files and _is_case_folder(entry):
                add(entry, UNCATEGORIZED)
                continue
            for child in sorted(entry.iterdir()):
                if child.name.startswith("."):
                    continue
                if (child.is_file() and child.suffix.lower() == ".zip") or child.is_dir():
                    add(child, entry.name)
    return check_unique_ids(refs)


def check_unique_ids(refs: list[CaseRef]) -> list[CaseRef]:
    """`refs` unchanged, or a ValueError naming two cases that share an id."""
    seen: dict[str, CaseRef] = {}
    for ref in refs:
        if ref.id in seen:
            raise ValueError(
                f"two cases have the id {ref.id!r} ({seen[ref.id].category}/ and {ref.category}/); "
                "rename one of them"
            )
        seen[ref.id] = ref
    return refs


def _rank(seed: int, case_id: str) -> str:
    return hashlib.blake2b(f"{seed}:{case_id}".encode(), digest_size=8).hexdigest()


def assign_splits(
    categories: dict[str, str], ratios: dict[str, float], seed: int = 0
) -> dict[str, str]:
    """Deterministic split per case id, stratified by category.

    Within each category cases are ordered by a hash of (seed, id), so the assignment does not
    depend on the order in which cases were found; each category is cut by the ratios with
    largest-remainder rounding. val and test each get at least one case when there are three or
    more cases in all, so a small dataset still evaluates.
    """
    names = ("train", "val", "test")
    by_category: dict[str, list[str]] = {}
    for case_id, category in categories.items():
        by_category.setdefault(category, []).append(case_id)
    splits: dict[str, str] = {}
    for category in sorted(by_category):
        ids = sorted(by_category[category], key=lambda i: _rank(seed, i))
        exact = [ratios[name] * len(ids) for name in names]
        counts = [int(x) for x in exact]
        for i in sorted(range(3), key=lambda i: exact[i] - counts[i], reverse=True)[: len(ids) - sum(counts)]:
            counts[i] += 1
        start = 0
        for name, count in zip(names, counts):
            for case_id in ids[start : start + count]:
                splits[case_id] = name
            start += count
    if len(splits) >= 3:
        for needed in ("val", "test"):
            if ratios[needed] > 0 and needed not in splits.values():
                train_ids = sorted((i for i, s in splits.items() if s == "train"), key=lambda i: _rank(seed, i))
                splits[train_ids[-1]] = needed
    return splits
