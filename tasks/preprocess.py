"""Prefect tasks over `ctdiff.preprocess`: per-case ingest (decode, resize), quarantine, splits.

Tasks take and return ids, paths and small dicts, never arrays. The case store is the cache of
record: a Prefect cache hit is possible only while the store holds that exact output, so a
deleted or half-written case is always recomputed, never served from a stale cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import Completed, State

from ctdiff import preprocess
from ctdiff.cases import CaseRef, assign_splits, discover_cases
from ctdiff.store import CaseStore
from tasks.training import OutputCache, is_transient


def _ingest_key(inputs: dict[str, Any]) -> str:
    """What a case's stored arrays are made from: its file and decode code (ctdiff.preprocess's
    decode key), then the grid, chunking and compression it was resized and written with."""
    native_key = preprocess.decode_key(CaseRef(**inputs["ref"]))
    return preprocess.resize_key(native_key, inputs["resolution"], inputs["chunk_slices"], inputs["level"])


def _ingested(inputs: dict[str, Any], key: str) -> bool:
    return preprocess.is_ingested(
        CaseStore(inputs["store_path"]), CaseRef(**inputs["ref"]),
        inputs["resolution"], inputs["chunk_slices"], inputs["level"],
    )


# The case store is the output of record: a cache hit only while it holds this exact case.
INGEST_CACHE = OutputCache(key_fn=_ingest_key, done_fn=_ingested)


@task(name="discover-cases")
def discover(input_dir: str) -> list[dict]:
    return [ref.to_dict() for ref in discover_cases(input_dir)]


@task(name="create-store")
def create_store(store_path: str) -> None:
    CaseStore(store_path).create()


@task(name="clear-staging")
def clear_staging(store_path: str) -> None:
    CaseStore(store_path).clear_staging()


@task(
    name="ingest-case",
    task_run_name="ingest-{ref[id]}",
    cache_policy=INGEST_CACHE,
    retry_condition_fn=is_transient,
    persist_result=True,
)
def ingest_case(ref: dict, store_path: str, resolution: int | None, chunk_slices: int, level: int) -> dict | State:
    """Decode one case into the store's native arrays, then resize it onto the configured grid.

    Returns the case's manifest entry. A quarantined case ends in a `Quarantined` state (a kind
    of Completed, so the UI tells it from an ingested one) whose result is its summary. Each
    half skips itself when the store holds its output already (ctdiff.preprocess), so a new
    grid re-reads the native arrays, not the DICOM. One task run per case, not one per step:
    each task run costs Prefect API calls and events.
    """
    case, store = CaseRef(**ref), CaseStore(store_path)
    summary = preprocess.decode_case(case, store, chunk_slices, level)
    if summary["status"] == "quarantined":
        return Completed(name="Quarantined", message=summary["reason"], data=summary)
    return preprocess.resize_case(case, store, resolution, chunk_slices, level)


@task(name="quarantine-case", task_run_name="quarantine-{ref[id]}")
def quarantine_case(ref: dict, store_path: str, reason: str) -> dict:
    # No cache key: a case that failed for transient reasons is tried again next run.
    return preprocess.quarantine_case(CaseStore(store_path), CaseRef(**ref), reason, key=None)


@task(name="write-splits")
def write_splits(store_path: str, ratios: dict[str, float], seed: int) -> list[dict]:
    """Assign ok cases to train/val/test (a case keeps the split it had under the same seed and
    ratios: ctdiff.cases.assign_splits) and return the manifest."""
    store = CaseStore(store_path)
    ok = {e["id"]: e["category"] for e in store.manifest() if e["status"] == "ok"}
    settings = {"seed": seed, "ratios": dict(ratios)}
    store.set_splits(assign_splits(ok, ratios, seed, previous=store.splits(settings)), settings)
    return store.manifest()


@task(name="preview-cases")
def preview_cases(store_path: str, window: list[float], out_dir: str, max_cases: int = 3) -> list[str]:
    """PNG previews (axial and coronal, thick and thin) of the first few ok cases."""
    from ctdiff.figures import case_preview

    store = CaseStore(store_path)
    center_hu, width_hu = window
    return [
        str(case_preview(store, case_id, center_hu, width_hu, Path(out_dir) / f"{case_id}.png"))
        for case_id in store.ids()[:max_cases]
    ]


MANIFEST_COLUMNS = ("id", "category", "status", "reason", "split", "n_thick", "n_thin", "seconds")


@task(name="report-manifest")
def report_manifest(manifest: list[dict], store_path: str) -> str:
    """Table and summary artifacts for the Prefect UI; returns the summary as Markdown."""
    rows = [{column: entry.get(column) for column in MANIFEST_COLUMNS} for entry in manifest]
    create_table_artifact(key="preprocess-cases", table=rows, description=f"Cases in {store_path}")
    n_ok = sum(e["status"] == "ok" for e in manifest)
    lines = [
        f"**{n_ok} of {len(manifest)} cases ok** in `{store_path}`",
        "",
        "| split | cases |",
        "|---|---|",
        *(f"| {s} | {sum(e.get('split') == s for e in manifest)} |" for s in ("train", "val", "test")),
    ]
    quarantined = [e for e in manifest if e["status"] == "quarantined"]
    if quarantined:
        lines += ["", "Quarantined:", *(f"- `{e['id']}`: {e['reason']}" for e in quarantined)]
    summary = "\n".join(lines)
    create_markdown_artifact(key="preprocess-summary", markdown=summary)
    return summary
