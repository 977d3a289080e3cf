"""Per-case preprocessing: decode DICOM → align → resize in-plane → case store.

The array steps (`align`, `resize_inplane`) are pure `Volume -> Volume` functions; the case
steps (`decode_case`, `resize_case`) add loading, cache keys and saving. Each case step is
keyed by what determines its output, so a re-run with nothing changed does nothing, and a new
resolution re-runs only the resize from the decoded native arrays.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

import numpy as np

from ctdiff import dicom
from ctdiff.cases import CaseRef
from ctdiff.errors import CaseError
from ctdiff.fingerprint import case_fingerprint, code_version, settings_digest
from ctdiff.store import CaseStore
from ctdiff.volume import KINDS, Volume

_RESIZE_BATCH_SLICES = 16  # bounds the float32 working copy during resize
V = TypeVar("V", Volume, dicom.SeriesReader)


def align(thick: V, thin: V) -> tuple[V, V]:
    """Crop the thin volume to the z-extent the thick slabs cover; positions are kept.

    Thick slice k at z_k stands for the slab [z_k - dz/2, z_k + dz/2), dz being the thick
    spacing, so the thin slices kept are those with centres in [z_0 - dz/2, z_last + dz/2).
    Works on geometry alone: on `Volume`s, or on series not yet decoded (`SeriesReader`).
    """
    dz_thick = thick.spacing_mm[0]
    dz_thin = thin.spacing_mm[0]
    tolerance_mm = 0.01 * dz_thin
    low = thick.z_mm[0] - dz_thick / 2 - tolerance_mm
    high = thick.z_mm[-1] + dz_thick / 2 - tolerance_mm
    if thin.z_mm[0] > low + dz_thin or thin.z_mm[-1] < high - dz_thin:
        raise CaseError(
            f"thin series (z {thin.z_mm[0]:.1f}..{thin.z_mm[-1]:.1f} mm) does not cover the thick "
            f"one (z {low:.1f}..{high:.1f} mm)"
        )
    keep = np.flatnonzero((thin.z_mm >= low) & (thin.z_mm < high))
    return thick, thin.crop(keep[0], keep[-1] + 1)


def resize_inplane(volume: Volume, resolution: int | None) -> Volume:
    """Resample each slice to resolution × resolution pixels (antialiased bilinear).

    HU are rounded back to int16, so the stored volume is exact for the resized grid. The
    field of view is kept: pixel spacing grows by the size ratio, and the origin moves by half
    a pixel's change because DICOM positions refer to pixel centres.
    """
    depth, height, width = volume.shape
    if resolution is None or (height, width) == (resolution, resolution):
        return volume
    import torch  # here, not at the top: the flow process and the decode step never need it
    import torch.nn.functional as F

    out = np.empty((depth, resolution, resolution), dtype=np.int16)
    for start in range(0, depth, _RESIZE_BATCH_SLICES):
        batch = torch.from_numpy(volume.hu[start : start + _RESIZE_BATCH_SLICES].astype(np.float32))
        resized = F.interpolate(
            batch[:, None], size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False
        )[:, 0]  # (B, resolution, resolution)
        out[start : start + len(batch)] = resized.round_().clamp_(-32768, 32767).numpy().astype(np.int16)
    dz, dy, dx = volume.spacing_mm
    new_dy, new_dx = dy * height / resolution, dx * width / resolution
    row_dir = np.asarray(volume.orientation[:3])
    col_dir = np.asarray(volume.orientation[3:])
    # The first pixel centre moves from 0.5 old pixels to 0.5 new pixels from the image edge.
    origin = np.asarray(volume.origin_mm) + row_dir * (new_dx - dx) / 2 + col_dir * (new_dy - dy) / 2
    return replace(volume, hu=out, spacing_mm=(dz, new_dy, new_dx), origin_mm=tuple(float(c) for c in origin))


# -- cache keys --------------------------------------------------------------------------------

@lru_cache(maxsize=4096)
def _digest_cached(path: str, size: int, mtime_ns: int) -> str:
    return case_fingerprint(path)


def case_digest(path: str | Path) -> str:
    """Content identity of a case (`case_fingerprint`), memoised per (path, size, mtime) within
    a process."""
    path = Path(path)
    stat = path.stat()
    return _digest_cached(str(path), stat.st_size, stat.st_mtime_ns)


def decode_key(ref: CaseRef) -> str:
    """Key of the native arrays: the case file's content and the code that decodes it."""
    return settings_digest("decode", case_digest(ref.path), _decode_code_version())


def resize_key(native_key: str, resolution: int | None, chunk_slices: int, level: int) -> str:
    return settings_digest("resize", native_key, resolution, chunk_slices, level, _resize_code_version())


@lru_cache(maxsize=1)
def _decode_code_version() -> str:
    from ctdiff import archive

    return code_version(archive, dicom, sys.modules[__name__])


@lru_cache(maxsize=1)
def _resize_code_version() -> str:
    from ctdiff import store

    return code_version(store, sys.modules[__name__])


# -- case steps --------------------------------------------------------------------------------


def decode_case(
    ref: CaseRef, store: CaseStore, chunk_slices: int = 8, level: int = 1
) -> dict:
    """Read and align a case's DICOM into `native/<id>`; bad data is quarantined, not raised.

    Returns a small summary: id, status ("ok" | "quarantined"), reason, cached, seconds and
    native_key. Transient I/O errors (OSError) propagate so the caller can retry them.
    """
    start = time.perf_counter()
    key = decode_key(ref)
    summary = {"id": ref.id, "native_key": key, "cached": True, "status": "ok", "reason": None}
    if store.native_key(ref.id) == key:
        return {**summary, "seconds": 0.0}
    if is_decoded(store, ref.id, key):  # quarantined with this very input and code
        entry = store.entry(ref.id) or {}
        return {**summary, "status": "quarantined", "reason": entry.get("reason"), "seconds": 0.0}
    try:
        # The pair is decoded as it is written, chunk by chunk: the (D, H, W) volumes are never
        # held whole, and the thin slices outside the thick extent are never decoded.
        case = dicom.open_case(Path(ref.path))
        thick, thin = align(case.thick, case.thin)
        store.write_native(
            ref.id, {"thick": thick, "thin": thin}, key,
            lambda: {"decode_seconds": time.perf_counter() - start, "n_files": case.n_files,
                     "n_ignored": case.n_ignored},
            chunk_slices, level,
        )
    except CaseError as error:
        quarantine_case(store, ref, error.reason, key=_quarantine_key(key))
        return {**summary, "cached": False, "status": "quarantined", "reason": error.reason,
                "seconds": time.perf_counter() - start}
    return {**summary, "cached": False, "seconds": time.perf_counter() - start}


def resize_case(
    ref: CaseRef, store: CaseStore, resolution: int | None, chunk_slices: int = 8, level: int = 1
) -> dict:
    """Resize a decoded case to the configured grid into `cases/<id>`, with its manifest entry."""
    start = time.perf_counter()
    native_key = store.native_key(ref.id)
    if native_key is None:
        raise RuntimeError(f"case {ref.id} has not been decoded into {store.path}")
    key = resize_key(native_key, resolution, chunk_slices, level)
    if store.case_key(ref.id) == key:
        return {**store.entry(ref.id), "cached": True}
    shapes = {kind: store.native_shape(ref.id, kind) for kind in KINDS}
    if resolution is None or all(shape[1:] == (resolution, resolution) for shape in shapes.values()):
        resized = {}  # the native arrays are the case: nothing to read or write
        spacing = {kind: store.native_spacing(ref.id, kind) for kind in KINDS}
    else:
        resized = {kind: resize_inplane(store.read_native(ref.id, kind), resolution) for kind in KINDS}
        shapes = {kind: volume.shape for kind, volume in resized.items()}
        spacing = {kind: volume.spacing_mm for kind, volume in resized.items()}
    entry = {
        "id": ref.id,
        "status": "ok",
        "reason": None,
        "category": ref.category,
        "n_thick": shapes["thick"][0],
        "n_thin": shapes["thin"][0],
        "shape_hw": list(shapes["thin"][1:]),
        "spacing_thick_mm": list(spacing["thick"]),
        "spacing_thin_mm": list(spacing["thin"]),
        "source_digest": case_digest(ref.path),
    }
    decode_seconds = store.native_attrs(ref.id).get("decode_seconds", 0.0)
    entry["seconds"] = round(decode_seconds + time.perf_counter() - start, 3)
    store.write_case(ref.id, resized, key, entry, chunk_slices, level)
    return {**entry, "cached": False}


def is_decoded(store: CaseStore, case_id: str, key: str) -> bool:
    """Whether the store holds the decode step's output for `key`: native arrays, or the
    quarantine entry that the same input and code produced."""
    return store.native_key(case_id) == key or store.case_key(case_id) == _quarantine_key(key)


def is_ingested(store: CaseStore, ref: CaseRef, resolution: int | None, chunk_slices: int, level: int) -> bool:
    """Whether both steps of `ref` are done for these settings, as their caches would find them:
    the resized arrays of this input and code, or its quarantine entry."""
    key = decode_key(ref)
    case_key = store.case_key(ref.id)
    if case_key == _quarantine_key(key):
        return True
    return store.native_key(ref.id) == key and case_key == resize_key(key, resolution, chunk_slices, level)


def _quarantine_key(native_key: str) -> str:
    return f"quarantine-{native_key}"


def quarantine_case(store: CaseStore, ref: CaseRef, reason: str, key: str | None = None) -> dict:
    """Record a case that could not be ingested, with its reason; `key=None` retries next run."""
    entry = {"id": ref.id, "status": "quarantined", "reason": reason, "category": ref.category,
             "n_thick": 0, "n_thin": 0}
    store.write_case(ref.id, {}, key or "", entry, chunk_slices=1, level=1)
    return entry
