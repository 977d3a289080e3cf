"""Flow `preprocess`: a folder of DICOM cases → the Zarr case store (SPEC §3)."""

from __future__ import annotations

from prefect import flow, get_run_logger

from ctdiff.cases import CaseRef
from ctdiff.config import Config, load_config, require_input
from ctdiff.layout import WorkLayout
from ctdiff.preprocess import is_ingested
from ctdiff.store import CaseStore, UnwritableError, write_refusal
from tasks.preprocess import (
    clear_staging,
    create_store,
    discover,
    ingest_case,
    preview_cases,
    quarantine_case,
    report_manifest,
    write_splits,
)
from tasks.progress import Progress
from tasks.runners import as_completed, dask_task_runner, failure_reason


@flow(name="ingest-cases")
def ingest_cases(refs: list[dict], store_path: str, config: Config) -> None:
    """Ingest every case on the task runner. A case whose task fails after its retries, or whose
    Dask workers keep dying under it, is quarantined with the reason; a store that refuses writes
    (read-only, full) stops the run, the cases not being to blame."""
    cfg = config.preprocess
    ingest = ingest_case.with_options(retries=cfg.retries, retry_delay_seconds=cfg.retry_delay_s)
    futures = {
        ingest.submit(ref, store_path=store_path, resolution=cfg.resolution, chunk_slices=cfg.chunk_slices,
                      level=cfg.compression_level): ref
        for ref in refs
    }
    # Each future is dropped once read (tasks.runners.as_completed pops it): Dask then frees the
    # task's result on its worker at once, so a worker's memory does not grow with the cases.
    with Progress(len(refs), "case", "preprocess") as progress:
        for future, ref in as_completed(futures):
            entry, error = _outcome(future)
            if error is not None:
                quarantine_case(ref, store_path, failure_reason(error))
                progress.advance(quarantined=ref["id"])
            elif entry["status"] == "quarantined":
                progress.advance(quarantined=ref["id"])
            else:
                progress.advance(case=ref["id"])


def _all_ingested(refs: list[dict], store_path: str, config: Config) -> bool:
    """Whether every case is in the store for these settings (see ctdiff.preprocess.is_ingested)."""
    cfg = config.preprocess
    store = CaseStore(store_path)
    return all(is_ingested(store, CaseRef(**ref), cfg.resolution, cfg.chunk_slices, cfg.compression_level)
               for ref in refs)


def _outcome(future) -> tuple[dict | None, Exception | None]:
    """A finished case task's result, or what it failed with: its own error after its retries,
    or Dask's KilledWorker (the task's state in Prefect then still reads Running). A store that
    refuses writes is raised: every other case would fail the same way."""
    try:
        return future.result(), None
    except Exception as error:  # noqa: BLE001 - the case is quarantined with it, or the run stops
        if isinstance(error, UnwritableError) or write_refusal(error):
            raise
        return None, error


@flow(name="preprocess")
def preprocess(config: str | None = None, overrides: list[str] | None = None) -> dict:
    """Ingest every case under `paths.input` into the case store at `paths.store`.

    Returns counts per status. Fails only when no case could be ingested.
    """
    cfg = load_config(config, overrides or [])
    input_dir = require_input(cfg)
    store_path = str(cfg.paths.store)
    logger = get_run_logger()
    refs = discover(str(input_dir))
    logger.info("found %d cases in %s", len(refs), input_dir)
    if not refs:
        raise ValueError(f"no cases (ZIPs or DICOM folders) in {input_dir}")
    create_store(store_path)
    try:
        if _all_ingested(refs, store_path, cfg):
            # A rerun: every case's task is a cache hit. They run in this flow, which neither
            # a Dask cluster nor a subflow run would speed up, only delay by their start-up.
            logger.info("all %d cases are in the store already: their tasks run here, without Dask", len(refs))
            ingest_cases.fn(refs, store_path, cfg)
        else:
            ingest_cases.with_options(task_runner=dask_task_runner(cfg.preprocess.dask))(refs, store_path, cfg)
    finally:
        clear_staging(store_path)  # what killed workers, or those stopped with the run, left half-written
    split = cfg.preprocess.split
    manifest = write_splits(store_path, {"train": split.train, "val": split.val, "test": split.test}, split.seed)
    summary = report_manifest(manifest, store_path)
    logger.info("preprocess summary:\n%s", summary)
    counts = {status: sum(e["status"] == status for e in manifest) for status in ("ok", "quarantined")}
    if counts["ok"] == 0:
        raise RuntimeError(f"no case could be ingested ({counts['quarantined']} quarantined); see the manifest")
    previews = preview_cases(store_path, cfg.preprocess.window.as_pair(), str(WorkLayout.of(cfg).previews))
    return {"store": store_path, **counts, "previews": previews}
