"""Content hashes that key caches: input files, code and settings (never hand-named)."""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path
from types import ModuleType
from typing import Any

_BLOCK_BYTES = 1 << 20


def file_digest(path: str | Path) -> str:
    """Hash of a case's content: a file's bytes, or a folder's relative paths and bytes."""
    path = Path(path)
    digest = hashlib.blake2b(digest_size=16)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if file != path:
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as handle:
            while block := handle.read(_BLOCK_BYTES):
                digest.update(block)
    return digest.hexdigest()


def code_version(*modules: ModuleType) -> str:
    """Hash of the source of the modules that compute an output: editing them invalidates it."""
    digest = hashlib.blake2b(digest_size=8)
    for module in modules:
        digest.update(inspect.getsource(module).encode())
    return digest.hexdigest()


def settings_digest(*parts: Any) -> str:
    """Hash of JSON-serialisable settings and upstream keys."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
