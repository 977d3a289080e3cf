"""Prefect tasks over `ctdiff.preprocess`: per-case decode and resize, quarantine, splits.

Tasks take and return ids, paths and small dicts, never arrays. The case store is the cache of
record: a Prefect cache hit is possible only while the store holds that exact output, so a
deleted or half-written case is always recomputed, never served from a stale cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import Completed, State

from ctdiff import preprocess
from ctdiff.cases import CaseRef, assign_splits, discover_cases
from ctdiff.store import CaseStore
from tasks.training import OutputCache, is_transient


@dataclass
class StoreBackedCache(OutputCache):
    """`OutputCache` of a per-case step, the case store being its output: key = the step's
    content key (case file hash + settings + code version), done = the store holds that output."""

    step: str = "decode"

    def __post_init__(self) -> None:
        self.key_fn, self.done_fn = (_decode_key, _decoded) if self.step == "decode" else (_resize_key, _resized)


def _decode_key(inputs: dict[str, Any]) -> str:
    return preprocess.decode_key(CaseRef(**inputs["ref"]))


def _decoded(inputs: dict[str, Any], key: str) -> bool:
    return preprocess.is_decoded(CaseStore(inputs["store_path"]), inputs["ref"]["id"], key)


def _resize_key(inputs: dict[str, Any]) -> str | None:
    native_key = CaseStore(inputs["store_path"]).native_key(inputs["ref"]["id"])
    if native_key is None:
        return None  # nothing decoded: the step will fail and must not be cached
    return preprocess.resize_key(native_key, inputs["resolution"], inputs["chunk_slices"], inputs["level"])


def _resized(inputs: dict[str, Any], key: str) -> bool:
    return CaseStore(inputs["store_path"]).case_key(inputs["ref"]["id"]) == key


@task(name="discover-cases")
def discover(input_dir: str) -> list[dict]:
    return [ref.to_dict() for ref in discover_cases(input_dir)]


@task(name="create-store")
def create_store(store_path: str) -> None:
    CaseStore(store_path).create()


@task(name="clear-staging")
def clear_staging(store_path: str) -> None:
    CaseStore(store_path).clear_staging()


def _case_step(step: str) -> dict[str, Any]:
    """Options shared by the per-case steps: run name, store-backed cache, transient retries."""
    return {
        "name": f"{step}-case",
        "task_run_name": f"{step}-{{ref[id]}}",
        "cache_policy": StoreBackedCache(step=step),
        "retry_condition_fn": is_transient,
        "persist_result": True,
    }


@task(**_case_step("decode"))
def decode_case(ref: dict, store_path: str, chunk_slices: int, level: int) -> dict | State:
    """The case's summary; a quarantined case ends in a `Quarantined` state (a kind of
    Completed, so the UI tells it from an ingested one) whose result is still the summary."""
    summary = preprocess.decode_case(CaseRef(**ref), CaseStore(store_path), chunk_slices, level)
    if summary["status"] == "quarantined":
        return Completed(name="Quarantined", message=summary["reason"], data=summary)
    return summary


@task(**_case_step("resize"))
def resize_case(ref: dict, store_path: str, resolution: int | None, chunk_slices: int, level: int) -> dict:
    return preprocess.resize_case(CaseRef(**ref), CaseStore(store_path), resolution, chunk_slices, level)


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
