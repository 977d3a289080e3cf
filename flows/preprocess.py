"""Flow `preprocess`: a folder of DICOM cases → the Zarr case store (SPEC §3)."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.futures import as_completed

from ctdiff.cases import CaseRef
from ctdiff.config import Config, load_config, require_input
from ctdiff.layout import WorkLayout
from ctdiff.preprocess import is_ingested
from ctdiff.store import CaseStore, UnwritableError, write_refusal
from tasks.preprocess import (
    clear_staging,
    create_store,
    decode_case,
    discover,
    quarantine_case,
    preview_cases,
    report_manifest,
    resize_case,
    write_splits,
)
from tasks.progress import Progress
from tasks.runners import dask_task_runner, failure_reason


@flow(name="ingest-cases")
def ingest_cases(refs: list[dict], store_path: str, config: Config) -> None:
    """Decode then resize every case on the task runner. A case whose step fails after its
    retries, or whose Dask workers keep dying under it, is quarantined with the reason; a store
    that refuses writes (read-only, full) stops the run, the cases not being to blame."""
    cfg = config.preprocess
    args = {"store_path": store_path, "chunk_slices": cfg.chunk_slices, "level": cfg.compression_level}
    retry = {"retries": cfg.retries, "retry_delay_seconds": cfg.retry_delay_s}
    decoder = decode_case.with_options(**retry)
    resizer = resize_case.with_options(**retry)
    decodes = {decoder.submit(ref, **args): ref for ref in refs}
    resizes = {}
    # Each future is dropped once read (`pop`; `as_completed` is given an iterator, which lets go
    # of its list when exhausted): Dask then frees the task's result on its worker at once, so a
    # worker's memory does not grow with the number of cases.
    with Progress(len(refs), "case", "preprocess") as progress:
        for future in as_completed(iter(list(decodes))):
            ref = decodes.pop(future)
            summary, error = _outcome(future)
            if error is not None:
                quarantine_case(ref, store_path, failure_reason(error))
                progress.advance(quarantined=ref["id"])
            elif summary["status"] == "quarantined":
                progress.advance(quarantined=ref["id"])
            else:
                resizes[resizer.submit(ref, resolution=cfg.resolution, **args)] = ref
        for future in as_completed(iter(list(resizes))):
            ref = resizes.pop(future)
            _, error = _outcome(future)
            if error is not None:
                quarantine_case(ref, store_path, failure_reason(error))
            progress.advance(case=ref["id"])


def _all_ingested(refs: list[dict], store_path: str, config: Config) -> bool:
    """Whether both steps of every case are done for these settings (see ctdiff.preprocess.is_ingested)."""
    cfg = config.preprocess
    store = CaseStore(store_path)
    return all(is_ingested(store, CaseRef(**ref), cfg.resolution, cfg.chunk_slices, cfg.compression_level)
               for ref in refs)


def _outcome(future) -> tuple[dict | None, Exception | None]:
    """A finished case step's summary, or what it failed with: its own error after its retries,
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
            # A rerun: every per-case step is a cache hit. They run in this flow, which neither
            # a Dask cluster nor a subflow run would speed up, only delay by their start-up.
            logger.info("all %d cases are in the store already: their steps run here, without Dask", len(refs))
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
