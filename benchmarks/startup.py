"""Benchmark: what a user waits for before any work, apart from the work.

    .venv/bin/python benchmarks/startup.py > startup.json            # ~3 min
    .venv/bin/python benchmarks/startup.py --demo > startup.json     # + a no-op demo rerun (~6 min)

Each `ctdiff` command runs in a fresh process with its own PREFECT_HOME, on three tiny synthetic
cases (their work is a second or two), and is timed from its start to its first task run
starting ("to first task", read from Prefect's log timestamps) and to its end:

- `first`    the first command ever (a new PREFECT_HOME: the server migrates a new database)
- `second`   a later command with new work (new cases: the ingest runs on Dask)
- `noop`     a later command whose every task is cached (preprocess again)
- `demo_noop` (with --demo) `ctdiff demo` again after a full demo run: the median of three
  reruns (`demo_noop_runs_total_s` lists all three)

for `background` (the default: the local server flows/local_server.py keeps running between
commands) and `embedded` (CTDIFF_SERVER=embedded: Prefect's temporary server per command, what
ctdiff did before; the baseline), measured in the same run. Targets (issue 12): to first task
<= 20 s first, <= 8 s later; a no-op demo rerun <= 10 s.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CTDIFF = [sys.executable, "-m", "flows.cli"]
_LOG_TIME = re.compile(r"^(\d\d:\d\d:\d\d\.\d\d\d) \| \w+ +\| Task run ", re.M)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def log(message: str) -> None:
    print(f"[startup-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def timed(args: list[str], env: dict, cwd: Path, timeout_s: int = 1200) -> dict:
    """Seconds to the first task run's log line and to the end of `ctdiff ARGS`."""
    started = dt.datetime.now()
    t0 = time.perf_counter()
    out = subprocess.run([*CTDIFF, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)
    total = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"ctdiff {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    first = _LOG_TIME.search(_ANSI.sub("", out.stderr))
    to_first = None
    if first:
        stamp = dt.datetime.combine(started.date(), dt.time.fromisoformat(first[1]))
        to_first = round((stamp - started).total_seconds(), 2)
    return {"to_first_task_s": to_first, "total_s": round(total, 2)}


def scenario(mode: str, work: Path, demo: bool) -> dict:
    from ctdiff.synth import SynthSpec, synthesize

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "CTDIFF_"))}
    env.update(PREFECT_HOME=str(work / "home"), PYTHONPATH=str(REPO_ROOT))
    if mode == "embedded":
        env["CTDIFF_SERVER"] = "embedded"
    for name, seed in (("a", 1), ("b", 2)):
        synthesize(work / name, SynthSpec(n_cases=3, size=32, n_thin=20, seed=seed))
    common = ["--set", "preprocess.resolution=null", "--set", "preprocess.dask.n_workers=2"]
    results = {}
    try:
        log(f"{mode}: first command")
        results["first"] = timed(["preprocess", "--set", "paths.input=a", "--set", "paths.store=a.zarr", *common], env, work)
        log(f"{mode}: second command (new work)")
        results["second"] = timed(["preprocess", "--set", "paths.input=b", "--set", "paths.store=b.zarr", *common], env, work)
        log(f"{mode}: no-op rerun")
        results["noop"] = timed(["preprocess", "--set", "paths.input=b", "--set", "paths.store=b.zarr", *common], env, work)
        if demo:
            log(f"{mode}: demo (full), then its no-op rerun")
            results["demo_first"] = timed(["demo"], env, work, timeout_s=3600)
            reruns = [timed(["demo"], env, work) for _ in range(3)]  # seconds vary ±10 % run to run
            results["demo_noop"] = sorted(reruns, key=lambda r: r["total_s"])[1]  # the median
            results["demo_noop_runs_total_s"] = [r["total_s"] for r in reruns]
    finally:
        subprocess.run([*CTDIFF, "server", "stop"], cwd=work, env=env, capture_output=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", action="store_true", help="also time a no-op `ctdiff demo` rerun")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO_ROOT))
    modes = {}
    for mode in ("embedded", "background"):
        with tempfile.TemporaryDirectory() as tmp:
            modes[mode] = scenario(mode, Path(tmp), args.demo)
        log(f"{mode}: {modes[mode]}")
    print(json.dumps({
        "benchmark": "startup", "date": time.strftime("%Y-%m-%d"), "machine": platform.machine(),
        "cpus": len(os.sched_getaffinity(0)), "baseline": "embedded (Prefect's temporary server per command)",
        "targets": {"first_to_first_task_s": 20, "later_to_first_task_s": 8, "demo_noop_total_s": 10},
        "results": modes,
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
