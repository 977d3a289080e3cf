"""Content hashes that key caches: input files, code and settings (never hand-named)."""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import zipfile
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any

_BLOCK_BYTES = 1 << 20
_PACKAGE = Path(__file__).parent  # ctdiff/


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


def case_fingerprint(path: str | Path) -> str:
    """Identity of a case's content. A ZIP is named by its central directory alone: every
    member's name, CRC-32 of its uncompressed bytes, sizes, compression and offset, and the
    file's size. Reading that costs milliseconds where hashing the bytes costs ~0.1 s per
    100 MB; any edit of a member changes its CRC-32 (but for a 1 in 2^32 chance per member).
    A folder, or a file that is not a readable ZIP, is hashed byte for byte (`file_digest`).
    """
    path = Path(path)
    if not path.is_file():
        return file_digest(path)
    try:
        with zipfile.ZipFile(path) as zf:
            members = [(i.filename, i.CRC, i.file_size, i.compress_size, i.compress_type, i.header_offset,
                        i.flag_bits) for i in zf.infolist()]
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError):
        return file_digest(path)  # not a ZIP, or a damaged one: its bytes are its identity
    text = json.dumps(["zip", path.stat().st_size, members])
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def code_version(*modules: ModuleType | str) -> str:
    """Hash of the source of `modules` and of every ctdiff module they import, directly or not
    (`import_closure`): editing any code that computes an output invalidates it."""
    digest = hashlib.blake2b(digest_size=8)
    for name in import_closure(*modules):
        digest.update(name.encode() + b"\0" + _source(name) + b"\0")
    return digest.hexdigest()


def import_closure(*modules: ModuleType | str) -> list[str]:
    """`modules` and the ctdiff modules they reach through imports (at any depth, including
    imports inside functions), sorted by name. Computed from the source, never kept by hand."""
    seen: set[str] = set()
    todo = [m if isinstance(m, str) else m.__name__ for m in modules]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(_local_imports(name))
    return sorted(seen)


def _source_path(name: str) -> Path:
    if name.split(".")[0] == _PACKAGE.name:  # ctdiff modules by file: nothing is imported
        parts = name.split(".")[1:]
        module = _PACKAGE.joinpath(*parts).with_suffix(".py")
        return module if module.is_file() else _PACKAGE.joinpath(*parts, "__init__.py")
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ValueError(f"no source for module {name!r}")
    return Path(spec.origin)


def _source(name: str) -> bytes:
    return _source_path(name).read_bytes()


@lru_cache(maxsize=None)
def _local_imports(name: str) -> tuple[str, ...]:
    """The ctdiff modules that module `name` imports anywhere in its source."""
    tree = ast.parse(_source(name))
    # A module-level `__getattr__` only re-exports names lazily (ctdiff.store.LatentStore): what
    # it imports computes nothing of this module's outputs.
    tree.body = [n for n in tree.body if not (isinstance(n, ast.FunctionDef) and n.name == "__getattr__")]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from ctdiff import latents` names a module; `from ctdiff.x import f` a member
            candidates = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        found.update(c for c in candidates if _is_package_module(c))
    return tuple(sorted(found - {name}))


def _is_package_module(name: str) -> bool:
    parts = name.split(".")
    if parts[0] != _PACKAGE.name:
        return False
    return _PACKAGE.joinpath(*parts[1:]).with_suffix(".py").is_file() or (
        _PACKAGE.joinpath(*parts[1:], "__init__.py").is_file()
    )


def settings_digest(*parts: Any) -> str:
    """Hash of JSON-serialisable settings and upstream keys."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
