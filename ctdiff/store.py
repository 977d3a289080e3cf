"""The case store: preprocessed CT cases in one Zarr v3 hierarchy (SPEC §3).

Layout::

    <store>/zarr.json            root group; attrs: format, splits
    <store>/native/<id>/         decoded DICOM on its native grid (arrays thick, thin)
    <store>/cases/<id>/          the case at the configured resolution, and its manifest entry
    <store>/.staging/            cases being written; renamed into place when complete

Two levels so that changing the in-plane resolution re-runs only the resize, never the DICOM
decode. When the resize is the identity, `cases/<id>` holds only the entry and reads fall
through to `native/<id>`, so the native grid is stored once. Every case group is written in
`.staging/` and renamed into place, so a case killed half-way is simply absent and redone.
Writers may race (Dask re-runs a task on a second worker while the first still runs, or a new
run starts beside the stragglers of an old one); see `_write_group` for why none of that serves
half a case. A store that refuses writes (read-only, full) raises `UnwritableError`.
Nothing patient-identifying is written: ids come from file names, geometry is numbers.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from ctdiff.atomic import replace_dir
from ctdiff.volume import Kind, SliceSource, Volume

STORE_FORMAT = 1
Attrs = dict[str, Any] | Callable[[], dict[str, Any]]
_WRITER = ".writer"  # in a staged group while its writer fills it; see _write_group

# What a filesystem answers to writes that no retry will change.
_REFUSALS = {
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


class UnwritableError(RuntimeError):
    """A folder that ctdiff must write refuses it (read-only, full, forbidden). Neither the cases'
    fault nor transient: the run stops with this one-line message, which names the folder."""


def write_refusal(error: BaseException) -> str | None:
    """What is wrong, in words, when `error` is a filesystem refusing a write; else None."""
    return _REFUSALS.get(error.errno) if isinstance(error, OSError) else None


def require_writable(folder: str | Path, what: str) -> None:
    """Raise UnwritableError ("cannot write <what> <folder>: <why>") unless a page can be written
    in `folder`, or in the nearest folder above it when it does not exist yet; creates nothing."""
    existing = next(p for p in (Path(folder).absolute(), *Path(folder).absolute().parents) if p.exists())
    probe = existing / f".ctdiff-probe-{uuid.uuid4().hex[:8]}"
    try:
        with open(probe, "xb") as file:
            file.write(bytes(4096))  # a filesystem with no room left refuses a page
            file.flush()
            os.fsync(file.fileno())
    except OSError as error:
        reason = write_refusal(error) or (None if existing.is_dir() else f"{existing} is not a folder")
        if reason is None:
            raise
        raise UnwritableError(f"cannot write {what} {folder}: {reason}") from None
    finally:
        if probe.exists():
            probe.unlink()


class CaseStore:
    """Read and write preprocessed cases; see the module docstring for the layout."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    # -- reading ---------------------------------------------------------------------------

    def exists(self) -> bool:
        return (self.path / "zarr.json").is_file()

    def manifest(self) -> list[dict[str, Any]]:
        """One entry per ingested case (ok or quarantined), sorted by id, with its split."""
        if not self.exists():
            return []
        splits = self._root().attrs.get("splits", {})
        entries = []
        for case_dir in sorted((self.path / "cases").glob("*/zarr.json")):
            entry = dict(zarr.open_group(case_dir.parent, mode="r").attrs["entry"])
            entry["split"] = splits.get(entry["id"])
            entries.append(entry)
        return entries

    def entry(self, case_id: str) -> dict[str, Any] | None:
        group = self._open(self.path / "cases" / case_id)
        return None if group is None else dict(group.attrs["entry"])

    def ids(self, split: str | None = None, status: str = "ok") -> list[str]:
        return [
            e["id"]
            for e in self.manifest()
            if e["status"] == status and (split is None or e["split"] == split)
        ]

    def read(self, case_id: str, kind: Kind, z_slice: slice = slice(None)) -> Volume:
        """The case's thick or thin volume at the store's resolution (optionally a slab)."""
        group = self._open(self.path / "cases" / case_id)
        if group is None or group.attrs["entry"]["status"] != "ok":
            raise KeyError(f"case {case_id!r} is not an ok case of {self.path}")
        if kind not in group:
            group = self._open(self.path / "native" / case_id)
        return _read_volume(group[kind], z_slice)

    def read_native(self, case_id: str, kind: Kind) -> Volume:
        return _read_volume(self._native_array(case_id, kind))

    def native_shape(self, case_id: str, kind: Kind) -> tuple[int, int, int]:
        """(D, H, W) of a decoded volume, without reading it."""
        return tuple(self._native_array(case_id, kind).shape)  # type: ignore[return-value]

    def native_spacing(self, case_id: str, kind: Kind) -> tuple[float, float, float]:
        """(dz, dy, dx) in mm of a decoded volume, without reading it."""
        return tuple(self._native_array(case_id, kind).attrs["spacing_mm"])  # type: ignore[return-value]

    def _native_array(self, case_id: str, kind: Kind) -> zarr.Array:
        return zarr.open_group(self.path / "native" / case_id, mode="r")[kind]

    def native_key(self, case_id: str) -> str | None:
        group = self._open(self.path / "native" / case_id)
        return None if group is None else group.attrs.get("key")

    def native_attrs(self, case_id: str) -> dict[str, Any]:
        group = self._open(self.path / "native" / case_id)
        return {} if group is None else dict(group.attrs)

    def case_key(self, case_id: str) -> str | None:
        """The cache key an ok or quarantined case was written with; None if absent."""
        group = self._open(self.path / "cases" / case_id)
        return None if group is None else group.attrs.get("key")

    def nbytes_stored(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    # -- writing ---------------------------------------------------------------------------

    def create(self) -> None:
        """Create the root group if needed, check that the store can be written, and clear
        staging left by killed writers."""
        require_writable(self.path, "the case store")
        with self._refusals():
            if not self.exists():
                root = zarr.open_group(self.path, mode="a", zarr_format=3)
                root.attrs.update({"format": STORE_FORMAT})
            self.clear_staging()

    def clear_staging(self) -> None:
        """Remove what killed writers left in `.staging/`. Each group is renamed away before it is
        deleted, so a writer still filling it finds its group gone and does not move it in."""
        with self._refusals():
            for staged in sorted((self.path / ".staging").glob("*")):
                self._discard(staged)

    def write_native(
        self, case_id: str, volumes: dict[Kind, SliceSource], key: str, attrs: Attrs, chunk_slices: int,
        level: int,
    ) -> None:
        """Write a case's decoded arrays. New arrays (a new key) first withdraw the case made from
        the old ones: a run killed in between leaves the case absent, not an old entry over them.
        `volumes` are read chunk by chunk (a `SeriesReader` decodes as it goes); `attrs` may be a
        function, called once they are written."""
        if self.native_key(case_id) != key:
            with self._refusals():
                self._discard(self.path / "cases" / case_id)
        def native_attrs() -> dict[str, Any]:
            return {"key": key, **(attrs() if callable(attrs) else attrs)}

        self._write_group("native", case_id, volumes, native_attrs, chunk_slices, level)

    def write_case(
        self, case_id: str, volumes: dict[Kind, Volume], key: str, entry: dict, chunk_slices: int, level: int
    ) -> None:
        """Write an ok case (empty `volumes` = use the native arrays) or a quarantined one."""
        assert entry["id"] == case_id and entry["status"] in ("ok", "quarantined")
        self._write_group("cases", case_id, volumes, {"key": key, "entry": entry}, chunk_slices, level)

    def set_splits(self, splits: dict[str, str], settings: dict[str, Any] | None = None) -> None:
        """Record every case's split and the settings (seed, ratios) they were assigned with."""
        self._root(mode="a").attrs.update({"splits": splits, "split_settings": settings})

    def splits(self, settings: dict[str, Any] | None = None) -> dict[str, str]:
        """The recorded splits; with `settings`, only if they were assigned with those (else {})."""
        if not self.exists():
            return {}
        attrs = self._root().attrs
        if settings is not None and attrs.get("split_settings") != settings:
            return {}
        return dict(attrs.get("splits", {}))

    # -- internals -------------------------------------------------------------------------

    def _root(self, mode: str = "r") -> zarr.Group:
        return zarr.open_group(self.path, mode=mode, zarr_format=3)

    @staticmethod
    def _open(path: Path) -> zarr.Group | None:
        return zarr.open_group(path, mode="r") if (path / "zarr.json").is_file() else None

    def _write_group(
        self, level_name: str, case_id: str, volumes: dict[Kind, SliceSource], attrs: Attrs, chunk_slices: int,
        level: int,
    ) -> None:
        """Write a group in staging, then move it onto `<level_name>/<case_id>`.

        Zarr recreates missing folders as it writes, so a writer whose staged group was cleared
        under it (`clear_staging` of a new run) would go on to fill a new one with the rest of
        the case only: the `_WRITER` mark, made first, is then missing and the write fails.
        A failed write removes its staged group (a full disk gets its space back).
        """
        staging = self.path / ".staging" / f"{level_name}-{case_id}-{uuid.uuid4().hex[:8]}"
        with self._refusals():
            try:
                group = zarr.open_group(staging, mode="w", zarr_format=3)
                (staging / _WRITER).touch()
                for kind, volume in volumes.items():
                    _write_volume(group, kind, volume, chunk_slices, level)
                if callable(attrs):
                    attrs = attrs()
                group.attrs.update(attrs)  # last: staging content is complete from here on
                (staging / _WRITER).unlink()  # FileNotFoundError: cleared under us, not moved in
                self._move_in(staging, self.path / level_name / case_id, attrs["key"])
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise

    def _move_in(self, staging: Path, target: Path, key: str) -> None:
        """Rename a staged group onto `target`. Another writer of the same output may get there
        first (the same task run twice at once): under an equal key, the group in place is kept,
        never swapped under a reader, and ours dropped; a lost rename race is tried again."""
        for attempt in range(3):
            if key and self._key_at(target) == key:
                shutil.rmtree(staging)
                return
            try:
                replace_dir(staging, target)
                return
            except OSError as error:  # ENOTEMPTY / ENOENT: the other writer's rename came between
                if attempt == 2 or error.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                    raise

    def _key_at(self, path: Path) -> str | None:
        try:
            group = self._open(path)
        except FileNotFoundError:  # renamed away between the check and the read
            return None
        return None if group is None else group.attrs.get("key")

    def _discard(self, path: Path) -> None:
        """Remove a group at once for readers (renamed into staging), then delete it."""
        trash = self.path / ".staging" / f"discarded-{uuid.uuid4().hex[:8]}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(path, trash)
        except FileNotFoundError:  # not there, or moved in or away by another writer
            return
        shutil.rmtree(trash)

    @contextmanager
    def _refusals(self) -> Iterator[None]:
        """The filesystem's refusals (read-only, full, forbidden) raised as UnwritableError."""
        try:
            yield
        except OSError as error:
            reason = write_refusal(error)
            if reason is None:
                raise
            raise UnwritableError(f"cannot write the case store {self.path}: {reason}") from error


def _write_volume(group: zarr.Group, kind: str, volume: SliceSource, chunk_slices: int, level: int) -> None:
    """Write `volume` one chunk of slices at a time; the write of a chunk (compression, which
    releases the GIL) overlaps reading the next (for a `SeriesReader`, decoding it)."""
    depth, height, width = volume.shape
    chunk = min(chunk_slices, depth)
    array = group.create_array(
        kind,
        shape=volume.shape,
        chunks=(chunk, height, width),
        dtype="int16",
        compressors=BloscCodec(cname="lz4", clevel=level, shuffle=BloscShuffle.bitshuffle),
        fill_value=-1024,
    )
    # Two buffers, used in turn: one is read into while the other is being written.
    buffers = [np.empty((chunk, height, width), dtype=np.int16) for _ in range(2)]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ctdiff-write") as writer:
        pending: Future | None = None
        for n, start in enumerate(range(0, depth, chunk)):
            stop = min(start + chunk, depth)
            hu = volume.read_hu(start, stop, out=buffers[n % 2][: stop - start])
            if pending is not None:
                pending.result()
            pending = writer.submit(array.__setitem__, slice(start, stop), hu)
        if pending is not None:
            pending.result()
    array.attrs.update(
        {
            "spacing_mm": [float(s) for s in volume.spacing_mm],
            "z_mm": [float(z) for z in volume.z_mm],
            "orientation": [float(c) for c in volume.orientation],
            "origin_mm": [float(c) for c in volume.origin_mm],
        }
    )


def _read_volume(array: zarr.Array, z_slice: slice = slice(None)) -> Volume:
    attrs = array.attrs
    z_mm = np.asarray(attrs["z_mm"], dtype=np.float64)[z_slice]
    origin = np.asarray(attrs["origin_mm"], dtype=np.float64)
    if len(z_mm) and z_slice != slice(None):
        # Move the origin along the slice normal to the first slice of the slab.
        orientation = np.asarray(attrs["orientation"])
        normal = np.cross(orientation[:3], orientation[3:])
        origin = origin + normal * (z_mm[0] - attrs["z_mm"][0])
    return Volume(
        hu=np.asarray(array[z_slice], dtype=np.int16),
        spacing_mm=tuple(attrs["spacing_mm"]),
        z_mm=z_mm,
        orientation=tuple(attrs["orientation"]),
        origin_mm=tuple(float(c) for c in origin),
    )


def __getattr__(name: str):
    # SPEC §3 names `ctdiff.store.LatentStore`; it lives in ctdiff.latents, resolved lazily so
    # that reading cases (ingest workers) never imports torch.
    if name == "LatentStore":
        from ctdiff.latents import LatentStore

        return LatentStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
