"""Atomic outputs: write beside the target, then rename, so a crash never leaves half a file.

Every file or folder ctdiff writes for others to read (checkpoints, cases, latents, reports,
figures, NIfTI and DICOM outputs, synthetic ZIPs) goes through one of these two functions.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; on success it is renamed onto `path`.

    The temporary name keeps `path`'s suffixes (libraries pick the format from them, e.g.
    `.nii.gz`, `.png`) and starts with a dot, so globs of the real outputs never see it. On an
    error the temporary file is removed and `path` is untouched. `durable`: fsync the file and
    then its folder, so the rename survives a power loss, not only a killed process.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffixes = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp{suffixes}")
    try:
        yield tmp
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
        if durable:
            _fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)  # only left when writing failed


def write_text(path: str | Path, text: str) -> Path:
    """`path` holding `text` (UTF-8), written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def replace_dir(source: Path, target: Path) -> None:
    """Move a finished folder into place; an older version is removed only after the move."""
    target.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if target.exists():
        old = source.parent / f"old-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
    os.rename(source, target)
    if old is not None:
        shutil.rmtree(old)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
