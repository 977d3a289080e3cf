"""Thread pools sized from the CPUs a process may use, shared, and free (ctdiff.threads)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from ctdiff import threads
from ctdiff.threads import (
    THREADS_VARIABLE, ThreadGovernor, _cpu_ticks, cgroup_cpu_quota, configure_threads, idle_cpus, threads_per_process,
)


def test_cgroup_quota_v2_and_v1(tmp_path):
    v2 = tmp_path / "cpu.max"
    v1 = (tmp_path / "cfs_quota_us", tmp_path / "cfs_period_us")
    v2.write_text("150000 100000\n")
    assert cgroup_cpu_quota(v2, v1) == 1.5
    v2.write_text("max 100000\n")
    assert cgroup_cpu_quota(v2, v1) is None
    v2.unlink()
    v1[0].write_text("300000\n")
    v1[1].write_text("100000\n")
    assert cgroup_cpu_quota(v2, v1) == 3.0
    v1[0].write_text("-1\n")  # v1's "no limit"
    assert cgroup_cpu_quota(v2, v1) is None


def test_usable_cpus_is_the_affinity_capped_by_the_quota(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    monkeypatch.setattr(threads, "cgroup_cpu_quota", lambda: 2.5)
    assert threads.usable_cpus() == 2
    monkeypatch.setattr(threads, "cgroup_cpu_quota", lambda: None)
    assert threads.usable_cpus() == 8
    monkeypatch.setattr(threads, "cgroup_cpu_quota", lambda: 0.5)
    assert threads.usable_cpus() == 1


def test_processes_share_the_cpus_and_the_variable_wins(monkeypatch):
    monkeypatch.delenv(THREADS_VARIABLE, raising=False)
    monkeypatch.setattr(threads, "usable_cpus", lambda: 8)
    assert [threads_per_process(n) for n in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]
    monkeypatch.setenv(THREADS_VARIABLE, "3")
    assert threads_per_process(2) == 3


STAT = "cpu  10 0 10 100 0 0 0 0 0 0\ncpu0 {u0} 0 0 {i0} 0 0 0 0 0 0\ncpu1 {u1} 0 0 {i1} 0 0 0 0 0 0\n"


def test_idle_cpus_counts_what_other_work_left_idle(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    # Over the sample: cpu0 fully busy (100 user ticks), cpu1 three-quarters idle.
    readings = iter([STAT.format(u0=0, i0=0, u1=0, i1=0), STAT.format(u0=100, i0=0, u1=25, i1=75)])
    assert idle_cpus(sample_s=0, read=lambda: next(readings)) == pytest.approx(0.75)
    assert _cpu_ticks(STAT.format(u0=1, i0=2, u1=3, i1=4), {1}) == {1: (4, 7)}


def test_adapting_leaves_out_busy_cpus_and_keeps_one(monkeypatch):
    monkeypatch.delenv(THREADS_VARIABLE, raising=False)
    monkeypatch.setattr(threads, "usable_cpus", lambda: 4)
    before = torch.get_num_threads()
    try:
        assert configure_threads(adapt=True, free=4.0) == 4
        assert configure_threads(adapt=True, free=1.2) == 1 and torch.get_num_threads() == 1
        assert configure_threads(adapt=True, free=0.0) == 1  # never none
        assert configure_threads(processes=2, adapt=True, free=4.0) == 2
        assert configure_threads(adapt=False) == 4 and torch.get_num_threads() == 4
        assert os.environ["OMP_NUM_THREADS"] == "4"  # for the processes started from here
    finally:
        torch.set_num_threads(before)


def test_governor_samples_at_most_every_period(monkeypatch):
    calls = []
    monkeypatch.setattr(threads, "configure_threads", lambda processes, adapt: calls.append(processes) or 2)
    governor = ThreadGovernor(processes=3, every_s=3600)
    assert governor() == 2 and governor() == 2
    assert calls == [3]


@pytest.mark.slow
def test_a_busy_machine_gets_fewer_threads():
    """Real load: one busy process per usable CPU leaves (almost) nothing idle, and the adapted
    pool shrinks to one thread; alone, it is as large as the CPUs."""
    cpus = len(os.sched_getaffinity(0))
    if cpus < 2:
        pytest.skip("one CPU: nothing to shrink")
    env = {k: v for k, v in os.environ.items() if k != THREADS_VARIABLE}
    probe = [sys.executable, "-c", "from ctdiff.threads import configure_threads; print(configure_threads(adapt=True))"]
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cpus)]
    try:
        loaded = int(subprocess.run(probe, env=env, capture_output=True, text=True, check=True).stdout)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert loaded == 1
