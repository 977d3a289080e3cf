"""How many threads a process of ctdiff's may run: the CPUs it may really use, shared fairly.

Torch, OpenMP and Blosc default to one thread per core of the machine. That is wrong twice over
in a container with a CPU quota (the machine's cores are not ours) and wherever several of our
processes share the cores (Dask workers each with a full pool multiply each other). On a busy
machine it is worst: a training step waits at its threads' barriers for whichever thread the
other load has descheduled (benchmarks/contention.py).

`usable_cpus()` counts the CPUs this process may run on (its affinity mask) capped by the
cgroup's CPU quota; `configure_threads(processes)` gives each of `processes` sharing them an
equal part, and sets torch's intra-op threads, Blosc's threads and the OpenMP variable that
processes started from here inherit. With `adapt=True` it also leaves out the CPUs that other
work keeps busy right now (sampled from /proc/stat), so a training beside another job runs
one thread per free core instead of stalling; `ThreadGovernor` re-checks that every half
minute of a long training. CTDIFF_THREADS, when set, is the number to use.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

THREADS_VARIABLE = "CTDIFF_THREADS"
_CGROUP_V2 = Path("/sys/fs/cgroup/cpu.max")
_CGROUP_V1 = (Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us"))


def cgroup_cpu_quota(v2: Path = _CGROUP_V2, v1: tuple[Path, Path] = _CGROUP_V1) -> float | None:
    """The cgroup's CPU quota in CPUs (e.g. 1.5), or None when unlimited or unknown."""
    try:
        quota, period = v2.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us, period_us = (int(path.read_text()) for path in v1)
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def _affinity() -> set[int]:
    """The CPUs this process may run on."""
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by the cgroup quota (rounded down,
    at least 1)."""
    cpus = len(_affinity())
    quota = cgroup_cpu_quota()
    if quota is not None:
        cpus = min(cpus, max(1, math.floor(quota)))
    return max(1, cpus)


def threads_per_process(processes: int = 1) -> int:
    """Each of `processes` sharing the usable CPUs gets an equal part, at least one thread;
    CTDIFF_THREADS overrides."""
    if os.environ.get(THREADS_VARIABLE):
        return max(1, int(os.environ[THREADS_VARIABLE]))
    return max(1, usable_cpus() // max(1, processes))


def _cpu_ticks(stat: str, cpus: set[int]) -> dict[int, tuple[int, int]]:
    """(idle, total) jiffies of each CPU in `cpus` from a /proc/stat text."""
    ticks = {}
    for line in stat.splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
            ticks[int(name[3:])] = (values[3] + values[4], sum(values))
    return ticks


def idle_cpus(sample_s: float = 0.2, read: Callable[[], str] | None = None) -> float | None:
    """How many of this process's CPUs sat idle over the next `sample_s` seconds (None where
    /proc/stat cannot be read). Call it between steps: this process is idle meanwhile, so
    what it sees busy is other work."""
    read = read or (lambda: Path("/proc/stat").read_text())
    cpus = _affinity()
    try:
        before = _cpu_ticks(read(), cpus)
        time.sleep(sample_s)
        after = _cpu_ticks(read(), cpus)
    except OSError:
        return None
    idle = 0.0
    for cpu, (idle_after, total_after) in after.items():
        idle_before, total_before = before.get(cpu, (idle_after, total_after))
        if total_after > total_before:
            idle += (idle_after - idle_before) / (total_after - total_before)
    return idle if after else None


def configure_threads(processes: int = 1, adapt: bool = False, free: float | None = None) -> int:
    """Size this process's thread pools for its share (see module doc); returns the threads.
    With `adapt`, no more threads than the CPUs other work leaves free now (`free`, else
    sampled), at least one."""
    threads = threads_per_process(processes)
    if adapt and not os.environ.get(THREADS_VARIABLE):
        free = idle_cpus() if free is None else free
        if free is not None:
            threads = max(1, min(threads, math.floor(free / max(1, processes) + 0.5)))
    # OpenMP reads it when it loads: torch imported later in this process, and processes
    # started from here, size their pools from it; a torch already imported is told directly.
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    try:
        from numcodecs import blosc
    except ImportError:
        return threads
    blosc.set_nthreads(threads)
    return threads


class ThreadGovernor:
    """Calls `configure_threads(processes, adapt=True)` at most every `every_s` seconds: a long
    training follows the machine as other jobs start and stop beside it."""

    def __init__(self, processes: int = 1, every_s: float = 30.0):
        self.processes, self.every_s = processes, every_s
        self._last = -math.inf
        self.threads: int | None = None

    def __call__(self) -> int | None:
        now = time.monotonic()
        if now - self._last < self.every_s:
            return self.threads
        self.threads = configure_threads(self.processes, adapt=True)
        self._last = time.monotonic()
        return self.threads
