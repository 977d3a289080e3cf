"""Benchmark: does a Dask worker's memory grow with the cases it has run, and under what?

    .venv/bin/python benchmarks/worker_memory.py --work /tmp/wm > worker-memory.json
    .venv/bin/python benchmarks/worker_memory.py --modes noop --cases 300   # Prefect alone

The same cases (`--size`² px, `--n-thin` thin slices; default 200 of 256², 150 thin, as in
scale.py) go through ctdiff's `decode_case` + `resize_case` on a LocalCluster of 2 worker
processes with the flow's worker settings, in up to five ways:

- `dask`: plain `client.submit` of one function doing both steps (the baseline: no Prefect);
- `prefect`: the same function as one bare Prefect task on a `DaskTaskRunner`, each future let
  go as it finishes (`tasks.runners.as_completed`, as the preprocess flow does);
- `prefect-held`: the same, read with `prefect.futures.as_completed`, which holds every future
  (so Dask keeps every task's result on its worker) until the last one finishes;
- `noop`, `noop-held`: a Prefect task that does nothing, as many runs as cases (Prefect's share).

For each it reports every worker's peak RSS in each quarter of the run (sampled every 0.2 s)
and the growth from the second quarter to the last (the first holds the workers' start-up)
per task run on that worker. Prefect modes use the API in PREFECT_API_URL, or Prefect's
temporary server when it is unset.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from benchmarks.scale import WorkerPeaks  # noqa: E402  (after the path insert)

N_WORKERS = 2


def log(message: str) -> None:
    print(f"[worker-memory {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def ingest(ref: dict, store_path: str) -> str:
    """Both per-case steps of the preprocess flow, at the native grid."""
    from ctdiff import preprocess
    from ctdiff.cases import CaseRef
    from ctdiff.store import CaseStore

    case, store = CaseRef(**ref), CaseStore(store_path)
    preprocess.decode_case(case, store, 8, 1)
    return preprocess.resize_case(case, store, None, 8, 1)["id"]


def nothing(ref: dict, store_path: str) -> str:
    return ref["id"]


def run_dask(refs: list[dict], store_path: str) -> None:
    from distributed import Client, LocalCluster, as_completed

    with LocalCluster(n_workers=N_WORKERS, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        futures = [client.submit(ingest, ref, store_path, pure=False) for ref in refs]
        for future in as_completed(futures):
            future.result()


def run_prefect(refs: list[dict], store_path: str, fn, hold: bool = False) -> None:
    """`fn` as a Prefect task per case; results read as they finish with the preprocess flow's
    `tasks.runners.as_completed`, or with `hold`, Prefect's, which keeps every future to the end."""
    from prefect import flow, task
    from prefect.futures import as_completed as prefect_as_completed
    from prefect_dask import DaskTaskRunner

    from tasks.runners import as_completed

    step = task(fn)
    runner = DaskTaskRunner(cluster_kwargs={"n_workers": N_WORKERS, "threads_per_worker": 1, "processes": True,
                                            "dashboard_address": ":0"})

    @flow(name="worker-memory", task_runner=runner)
    def run() -> None:
        futures = {step.submit(ref, store_path): ref for ref in refs}
        if hold:
            for future in prefect_as_completed(iter(list(futures))):
                futures.pop(future)
                future.result()
        else:
            for future, _ in as_completed(futures):
                future.result()

    run()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", choices=("dask", "prefect", "prefect-held", "noop", "noop-held"),
                        default=["dask", "prefect", "prefect-held", "noop", "noop-held"])
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--n-thin", type=int, default=150)
    parser.add_argument("--work", type=Path, default=None, help="keep the cases here (default: a temp folder)")
    args = parser.parse_args()

    import dask

    from ctdiff.cases import discover_cases
    from ctdiff.store import CaseStore
    from ctdiff.synth import SynthSpec, synthesize
    from tasks.runners import use_worker_prespawn_env

    work = args.work or Path(tempfile.mkdtemp(prefix="ctdiff-worker-memory-"))
    cases = work / f"cases-{args.size}-{args.n_thin}"
    if not (cases.is_dir() and len(list(cases.rglob("*.zip"))) >= args.cases):
        log(f"writing {args.cases} synthetic cases ({args.size} px, {args.n_thin} thin slices) to {cases}")
        synthesize(cases, SynthSpec(n_cases=args.cases, size=args.size, n_thin=args.n_thin, seed=7))
    refs = [ref.to_dict() for ref in discover_cases(str(cases))][: args.cases]
    use_worker_prespawn_env()  # the preprocess flow's worker settings
    dask.config.set({"distributed.worker.profile.enabled": False, "distributed.scheduler.worker-saturation": 1.0})
    runs = {"dask": lambda s: run_dask(refs, s), "prefect": lambda s: run_prefect(refs, s, ingest),
            "prefect-held": lambda s: run_prefect(refs, s, ingest, hold=True),
            "noop": lambda s: run_prefect(refs, s, nothing), "noop-held": lambda s: run_prefect(refs, s, nothing, hold=True)}
    results = {}
    for mode in args.modes:
        store_path = work / f"store-{mode}.zarr"
        shutil.rmtree(store_path, ignore_errors=True)
        CaseStore(store_path).create()
        log(f"{mode}: {len(refs)} cases on {N_WORKERS} workers")
        start = time.perf_counter()
        with WorkerPeaks(os.getpid()) as peaks:
            runs[mode](str(store_path))
        quarters = sorted(([round(rss / 2**20, 1) for rss in q] for q in peaks.quarters().values()),
                          reverse=True)[:N_WORKERS]
        per_worker_runs = len(refs) / N_WORKERS
        results[mode] = {
            "seconds": round(time.perf_counter() - start, 1),
            "worker_peak_rss_mb_by_quarter": quarters,
            # From the second quarter's peak to the last's (the first holds the workers' start):
            # over about half of each worker's task runs.
            "growth_kb_per_task_run": [round((q[3] - q[1]) * 1024 / (per_worker_runs / 2), 1) for q in quarters],
        }
        log(json.dumps(results[mode]))
    print(json.dumps({
        "benchmark": "worker_memory", "date": time.strftime("%Y-%m-%d"), "machine": platform.machine(),
        "cpus": len(os.sched_getaffinity(0)), "cases": len(refs), "case": {"size": args.size, "n_thin": args.n_thin},
        "baseline": "mode dask: the same steps without Prefect, same run", "results": results,
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
