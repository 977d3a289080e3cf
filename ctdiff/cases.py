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


SPLITS = ("train", "val", "test")


def split_position(seed: int, case_id: str) -> float:
    """A case's place in [0, 1): a hash of (seed, id), uniform over cases and fixed for life."""
    digest = hashlib.blake2b(f"{seed}:{case_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def split_of(case_id: str, ratios: dict[str, float], seed: int = 0) -> str:
    """The split of one case from its id, the seed and the ratios alone: train below the train
    ratio, val below train + val, test above. Adding or removing other cases never moves it."""
    position, edge = split_position(seed, case_id), 0.0
    for name in SPLITS[:-1]:
        edge += ratios[name]
        if position < edge:
            return name
    return SPLITS[-1]


def assign_splits(
    categories: dict[str, str], ratios: dict[str, float], seed: int = 0, previous: dict[str, str] | None = None
) -> dict[str, str]:
    """The split of every case: `previous` splits kept, every other case by `split_of`.

    Stable: a case's split never changes once assigned, so a checkpoint's test cases stay test
    cases however the store grows. Stratification by category is what a per-case hash gives:
    each category is split by the ratios in expectation (not exactly), since exact counts per
    category would move cases whenever one is added. One exception keeps small stores
    evaluable: with three or more cases, a split with a positive ratio that no case falls into
    takes the train case nearest to its interval (`previous` keeps that choice afterwards).
    Pass `previous` only when it was assigned with the same seed and ratios.
    """
    previous = previous or {}
    splits = {case_id: previous.get(case_id) or split_of(case_id, ratios, seed) for case_id in categories}
    if len(splits) >= 3:
        for index, needed in enumerate(SPLITS[1:], start=1):
            if ratios[needed] > 0 and needed not in splits.values():
                low = sum(ratios[name] for name in SPLITS[:index])  # the interval [low, low + ratio)
                train = [i for i, s in splits.items() if s == "train" and i not in previous] or [
                    i for i, s in splits.items() if s == "train"
                ]
                if train:
                    nearest = min(train, key=lambda i: (abs(split_position(seed, i) - low), i))
                    splits[nearest] = needed
    return splits
