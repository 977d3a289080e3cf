"""Benchmark: `ctdiff preprocess` as the number of cases grows, on one machine.

    .venv/bin/python benchmarks/scale.py > scale.json                     # N = 25 50 100 200
    .venv/bin/python benchmarks/scale.py --sizes 10 20 --size 64 --n-thin 40   # a quick look

Synthetic cases (`--size`² px, `--n-thin` thin slices, default 256² and 150) are written once
and the first N of them go through the `preprocess` command (2 Dask workers, a fresh store, the
local background server started beforehand so its start-up is not counted) for each N. For
each N it reports: wall seconds, seconds per case and the marginal seconds per case of the cases
added since the previous N (flat when no work grows with N², such as rewriting a manifest per
case), the peak RSS of each Dask worker (sampled every 0.2 s with psutil) and that peak less the
worker peak of a run of two tiny (32 px) cases, i.e. less code and Prefect/Dask runtime ("work"
memory), against the in-memory size of one case's HU, and the sizes of the Prefect artifacts the run made (what the UI loads). Baseline:
the smallest N's seconds per case, same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]
CTDIFF = [sys.executable, "-m", "flows.cli"]


def log(message: str) -> None:
    print(f"[scale-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class WorkerPeaks:
    """RSS of every Dask worker process below `root`, sampled every 0.2 s in a thread: the peak
    of each (`peaks`, bytes) and its peak in each quarter of the sampled time (`quarters`)."""

    def __init__(self, root: int):
        self.root, self._stop = root, threading.Event()
        self.samples: dict[int, list[tuple[float, int]]] = {}  # pid: [(time, rss bytes)]
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                children = psutil.Process(self.root).children(recursive=True)
            except psutil.NoSuchProcess:
                return
            for child in children:
                try:
                    if "distributed" in " ".join(child.cmdline()) or "spawn_main" in " ".join(child.cmdline()):
                        self.samples.setdefault(child.pid, []).append((time.time(), child.memory_info().rss))
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            time.sleep(0.2)

    def __enter__(self) -> "WorkerPeaks":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peaks(self) -> dict[int, int]:
        return {pid: max(rss for _, rss in samples) for pid, samples in self.samples.items()}

    def quarters(self) -> dict[int, list[int]]:
        """Each worker's peak RSS (bytes) in each quarter of its sampled time (workers sampled
        fewer than 8 times are left out)."""
        out = {}
        for pid, samples in self.samples.items():
            if len(samples) < 8:
                continue
            t0, t1 = samples[0][0], samples[-1][0]
            bounds = [t0 + (t1 - t0) * q / 4 for q in range(5)]
            out[pid] = [max(rss for t, rss in samples if bounds[q] <= t <= bounds[q + 1]) for q in range(4)]
        return out


def artifact_bytes(api_url: str, flow_run_ids: set[str]) -> dict[str, int]:
    import httpx

    artifacts = httpx.post(f"{api_url}/artifacts/filter", json={"limit": 200}).json()
    sizes = {}
    for artifact in artifacts:
        if artifact.get("flow_run_id") in flow_run_ids:
            key = artifact.get("key") or artifact["type"]
            sizes[key] = sizes.get(key, 0) + len(json.dumps(artifact.get("data")))
    return sizes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[25, 50, 100, 200])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--n-thin", type=int, default=150)
    parser.add_argument("--work", type=Path, default=None, help="keep the cases here (default: a temp folder)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO_ROOT))
    import httpx

    from ctdiff.synth import SynthSpec, synthesize

    work = args.work or Path(tempfile.mkdtemp(prefix="ctdiff-scale-"))
    cases = work / "cases"
    n_max = max(args.sizes)
    if not (cases.is_dir() and len(list(cases.rglob("*.zip"))) >= n_max):
        log(f"writing {n_max} synthetic cases ({args.size} px, {args.n_thin} thin slices) to {cases}")
        synthesize(cases, SynthSpec(n_cases=n_max, size=args.size, n_thin=args.n_thin, seed=7))
    zips = sorted(cases.rglob("*.zip"))[:n_max]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "CTDIFF_"))}
    env.update(PREFECT_HOME=str(work / "home"), PYTHONPATH=str(REPO_ROOT))
    subprocess.run([*CTDIFF, "server", "start"], cwd=work, env=env, check=True, capture_output=True)
    api_url = json.loads((work / "home" / "ctdiff-server.json").read_text())["api_url"]
    case_hu_bytes = args.size * args.size * (args.n_thin + args.n_thin // 5) * 2  # int16 thin + thick
    tiny = work / "tiny"  # 2 cases of 32 px: a worker's memory with the runtime and no case data
    if not tiny.is_dir():
        synthesize(tiny, SynthSpec(n_cases=2, size=32, n_thin=20, seed=7))

    def run(subset: Path, name: str) -> dict:
        for old in (work / f"store-{name}.zarr", work / f"work-{name}"):  # a rerun with --work starts afresh
            shutil.rmtree(old, ignore_errors=True)
        before = {r["id"] for r in httpx.post(f"{api_url}/flow_runs/filter", json={}).json()}
        start = time.perf_counter()
        process = subprocess.Popen(
            [*CTDIFF, "preprocess", "--set", f"paths.input={subset}", "--set", f"paths.store={work}/store-{name}.zarr",
             "--set", f"paths.work={work}/work-{name}", "--set", "preprocess.resolution=null",
             "--set", "preprocess.dask.n_workers=2", "--set", "preprocess.dask.memory_limit=4GiB"],
            cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        with WorkerPeaks(process.pid) as peaks:
            _, err = process.communicate()
        seconds = time.perf_counter() - start
        if process.returncode != 0:
            raise RuntimeError(f"preprocess of {subset} failed:\n{err[-3000:]}")
        runs = {r["id"] for r in httpx.post(f"{api_url}/flow_runs/filter", json={}).json()} - before
        return {"seconds": round(seconds, 1), "worker_peak_rss_mb": [round(p / 2**20) for p in
                                                                    sorted(peaks.peaks.values(), reverse=True)[:2]],
                # Whether the peak rises through the run (something kept per case) or not.
                "worker_peak_rss_mb_by_quarter": sorted(([round(p / 2**20) for p in q] for q in peaks.quarters().values()),
                                                        reverse=True)[:2],
                "artifact_bytes": artifact_bytes(api_url, runs)}

    rows = []
    try:
        log("runtime memory: 2 tiny cases")
        runtime_mb = max(run(tiny, "tiny")["worker_peak_rss_mb"])
        for n in sorted(args.sizes):
            subset = work / f"in-{n}"
            if not subset.is_dir():
                for path in zips[:n]:
                    target = subset / path.relative_to(cases)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.symlink_to(path)
            log(f"N = {n}: preprocess")
            row = {"cases": n, **run(subset, str(n))}
            row["seconds_per_case"] = round(row["seconds"] / n, 3)
            rows.append(row)
            log(json.dumps(rows[-1]))
    finally:
        subprocess.run([*CTDIFF, "server", "stop"], cwd=work, env=env, capture_output=True)
    base = rows[0]["seconds_per_case"]
    previous = None
    for row in rows:
        row["per_case_vs_smallest"] = round(row["seconds_per_case"] / base, 2)
        # The cost of the cases added since the previous N: flat when nothing grows with N.
        if previous is not None:
            row["marginal_seconds_per_case"] = round(
                (row["seconds"] - previous["seconds"]) / (row["cases"] - previous["cases"]), 3)
        row["worker_work_mb"] = [round(mb - runtime_mb) for mb in row["worker_peak_rss_mb"]]
        row["worker_work_over_case_hu"] = [round((mb - runtime_mb) * 2**20 / case_hu_bytes, 2)
                                           for mb in row["worker_peak_rss_mb"]]
        previous = row
    print(json.dumps({
        "benchmark": "scale", "date": time.strftime("%Y-%m-%d"), "machine": platform.machine(),
        "cpus": len(os.sched_getaffinity(0)), "case": {"size": args.size, "n_thin": args.n_thin,
                                                        "hu_bytes": case_hu_bytes},
        "baseline": "seconds per case at the smallest N, same run", "worker_runtime_rss_mb": runtime_mb,
        "results": rows,
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
