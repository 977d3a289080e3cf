"""Faults that ingestion survives, for real: Dask workers killed in the middle of a case, two
writers of one case, and a case store that is read-only or runs out of space."""

import contextvars
import errno
import io
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dask
import distributed  # noqa: F401 - its config defaults load before the tests' dask.config.set
import numpy as np
import pydicom
import pytest

import ctdiff.store
from ctdiff.store import CaseStore
from ctdiff.synth import SynthSpec, synthesize
from ctdiff.volume import Volume

SPEC = SynthSpec(n_cases=4, size=32, n_thin=20, seed=5)
FLOW_TIMEOUT_S = 150  # a flow run that takes longer has hung: fail instead of waiting forever


# -- a fault inside a Dask worker ---------------------------------------------------------------
# This module is also the workers' preload (distributed.worker.preload): `dask_setup` runs in
# every worker process that the flow's LocalCluster starts, restarted ones included.


def dask_setup(worker) -> None:
    """In a worker: writing case $CTDIFF_FAULT_CASE's decoded arrays stops after the thick one,
    a half-written group in the store's `.staging/`. Mode `hang`: once, the worker writes its
    pid to $CTDIFF_FAULT_DIR/pid and waits to be killed. Mode `die`: every time, it kills itself
    (a case that runs its worker out of memory). Every group write is logged to .../writes."""
    fault_dir = os.environ.get("CTDIFF_FAULT_DIR")
    if not fault_dir:
        return
    fault_dir, case, mode = Path(fault_dir), os.environ["CTDIFF_FAULT_CASE"], os.environ["CTDIFF_FAULT_MODE"]
    write_group, write_volume = CaseStore._write_group, ctdiff.store._write_volume

    def logged_write_group(self, level_name, case_id, *args):
        with open(fault_dir / "writes", "a") as log:
            log.write(f"{level_name}-{case_id}\n")
        write_group(self, level_name, case_id, *args)

    def faulty_write_volume(group, kind, volume, *args):
        write_volume(group, kind, volume, *args)
        if kind != "thick" or not Path(group.store.root).name.startswith(f"native-{case}-"):
            return
        if mode == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            (fault_dir / "armed").unlink()  # claimed by one worker, once
        except FileNotFoundError:
            return
        (fault_dir / "pid.tmp").write_text(str(os.getpid()))
        os.replace(fault_dir / "pid.tmp", fault_dir / "pid")
        time.sleep(300)

    CaseStore._write_group = logged_write_group
    ctdiff.store._write_volume = faulty_write_volume


@pytest.fixture
def faulty_workers(monkeypatch, tmp_path):
    """`arm(case, mode)`: the fault of `dask_setup` for the Dask workers started in this test."""
    fault_dir = tmp_path / "fault"
    fault_dir.mkdir()

    def arm(case: str, mode: str) -> Path:
        (fault_dir / "armed").touch()
        (fault_dir / "writes").touch()
        monkeypatch.setenv("CTDIFF_FAULT_DIR", str(fault_dir))
        monkeypatch.setenv("CTDIFF_FAULT_CASE", case)
        monkeypatch.setenv("CTDIFF_FAULT_MODE", mode)
        return fault_dir

    with dask.config.set({"distributed.worker.preload": [__file__]}):
        yield arm


def _kill_when_inside(
    fault_dir: Path, store_path: Path, case: str, timeout_s: float = 90.0
) -> dict[str, list[str]]:
    """SIGKILL the worker that the `hang` fault holds inside `case`; returns what that case had
    staged then ({group: [its entries]}). Other workers go on committing their own groups
    meanwhile, so only the held case's groups are read."""
    deadline = time.monotonic() + timeout_s
    while not (fault_dir / "pid").exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no worker reached the fault within {timeout_s} s")
        time.sleep(0.05)
    pid = int((fault_dir / "pid").read_text())
    assert pid != os.getpid()
    staging = store_path / ".staging"
    held = [group for group in _staged(store_path) if group.split("-", 1)[1].startswith(f"{case}-")]
    staged = {group: sorted(p.name for p in (staging / group).iterdir()) for group in held}
    os.kill(pid, signal.SIGKILL)
    return staged


def _start_preprocess(overrides: list[str]) -> tuple[threading.Thread, dict]:
    """The preprocess flow in a daemon thread, so that a hung run fails the test, not the suite."""
    from flows.preprocess import preprocess

    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = preprocess(config=None, overrides=overrides)
        except BaseException as error:  # noqa: BLE001 - handed to the test
            outcome["error"] = error

    thread = threading.Thread(target=contextvars.copy_context().run, args=(run,), daemon=True)
    thread.start()
    return thread, outcome


def _finish(thread: threading.Thread, outcome: dict) -> dict:
    thread.join(FLOW_TIMEOUT_S)
    assert not thread.is_alive(), f"preprocess did not finish within {FLOW_TIMEOUT_S} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _preprocess(overrides: list[str]) -> dict:
    return _finish(*_start_preprocess(overrides))


# -- an independent reading of the cases --------------------------------------------------------


def _independent_read(path: Path) -> dict[str, np.ndarray]:
    """Thick and thin HU (D, H, W) straight from pydicom: series told apart by slice thickness,
    sorted by z, modality LUT applied, the thin one cropped to the thick slabs."""
    series: dict[float, list] = {}
    with zipfile.ZipFile(path) as zf:
        for name in zf.namelist():
            ds = pydicom.dcmread(io.BytesIO(zf.read(name)))
            if ds.get("Modality") == "CT" and "LOCALIZER" not in ds.ImageType:
                series.setdefault(float(ds.SliceThickness), []).append(ds)
    volumes, z_mm = {}, {}
    for kind, thickness in (("thick", SPEC.thick_mm), ("thin", SPEC.thin_mm)):
        slices = sorted(series[thickness], key=lambda ds: float(ds.ImagePositionPatient[2]))
        z_mm[kind] = np.array([float(ds.ImagePositionPatient[2]) for ds in slices])
        hu = np.stack([pydicom.pixels.apply_modality_lut(ds.pixel_array, ds) for ds in slices])
        volumes[kind] = np.maximum(hu, -1024).astype(np.int16)  # padding → air
    half_mm = SPEC.thick_mm / 2
    keep = (z_mm["thin"] >= z_mm["thick"][0] - half_mm) & (z_mm["thin"] < z_mm["thick"][-1] + half_mm)
    volumes["thin"] = volumes["thin"][keep]
    return volumes


def _served_cases(store_path: Path, cases: list[Path]) -> dict[str, str]:
    """{id: status} of the manifest, after checking that each ok case reads back exactly as an
    independent reading of its DICOM gives it, and that each quarantined one has a reason."""
    store = CaseStore(store_path)
    by_id = {path.stem: path for path in cases}
    served = {}
    for entry in store.manifest():
        served[entry["id"]] = entry["status"]
        if entry["status"] == "quarantined":
            assert entry["reason"], entry
            continue
        assert entry["status"] == "ok", entry
        expected = _independent_read(by_id[entry["id"]])
        for kind in ("thick", "thin"):
            np.testing.assert_array_equal(store.read(entry["id"], kind).hu, expected[kind])
            assert entry[f"n_{kind}"] == len(expected[kind])
    return served


def _staged(store_path: Path) -> list[str]:
    return sorted(p.name for p in (store_path / ".staging").glob("*"))


@pytest.fixture
def cases(tmp_path):
    return synthesize(tmp_path / "cases", SPEC)


def _overrides(tmp_path: Path, store_path: Path | None = None, n_workers: int = 2) -> list[str]:
    return [
        f"paths.input={tmp_path / 'cases'}", f"paths.store={store_path or tmp_path / 'store.zarr'}",
        f"paths.work={tmp_path / 'work'}", "preprocess.resolution=null",
        f"preprocess.dask.n_workers={n_workers}", "preprocess.dask.memory_limit=1GiB",
        "preprocess.retries=1", "preprocess.retry_delay_s=0",
    ]


# -- a Dask worker killed in the middle of a case -----------------------------------------------


@pytest.mark.slow
def test_worker_killed_inside_a_case(cases, tmp_path, prefect_harness, faulty_workers):
    """SIGKILL of the worker writing a case: the case is never served half-written, the other
    cases finish, what Dask re-runs is not written twice, and a rerun completes the store.
    The victim is submitted last, so its worker holds a finished decode when it dies."""
    victim = cases[-1].stem
    fault_dir = faulty_workers(victim, "hang")
    store_path = tmp_path / "store.zarr"

    flow = _start_preprocess(_overrides(tmp_path))
    staged = _kill_when_inside(fault_dir, store_path, victim)
    result = _finish(*flow)
    # Killed half-way through the case: its arrays staged, thick only, unfinished.
    (half,) = [group for group in staged if group.startswith(f"native-{victim}-")]
    assert staged[half] == [".writer", "thick", "zarr.json"]
    ids = {p.stem for p in cases}
    assert _served_cases(store_path, cases) == dict.fromkeys(ids, "ok"), result
    assert (result["ok"], result["quarantined"]) == (len(cases), 0)
    assert _staged(store_path) == []  # the half-written group was cleared, never served
    # Every group was written once, the victim's arrays twice, even where Dask re-ran finished
    # decodes whose results lived on the dead worker (cache hits, no write; whether the worker
    # held one when it died depends on timing, so Dask's log of it is not asserted).
    writes = (fault_dir / "writes").read_text().split()
    once = [f"{level}-{i}" for level in ("native", "cases") for i in ids]
    assert sorted(writes) == sorted([*once, f"native-{victim}"])

    again = _preprocess(_overrides(tmp_path))
    assert (again["ok"], again["quarantined"]) == (len(cases), 0)
    assert _served_cases(store_path, cases) == dict.fromkeys(ids, "ok")
    assert _staged(store_path) == []


@pytest.mark.slow
def test_case_that_kills_its_workers_is_quarantined(cases, tmp_path, prefect_harness, faulty_workers):
    """A case whose worker dies each time it runs (out of memory) is quarantined with the reason
    once Dask gives up on it; the flow completes the others, and a rerun retries it. One worker,
    the victim first: the next case waits on the scheduler, not on the worker, so it is not
    blamed for the deaths (Dask blames every task a dead worker held)."""
    victim = cases[0].stem
    faulty_workers(victim, "die")
    store_path = tmp_path / "store.zarr"
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
        result = _preprocess(_overrides(tmp_path, n_workers=1))
    ids = {p.stem for p in cases}
    assert _served_cases(store_path, cases) == {**dict.fromkeys(ids, "ok"), victim: "quarantined"}
    assert (result["ok"], result["quarantined"]) == (len(cases) - 1, 1)
    reason = CaseStore(store_path).entry(victim)["reason"]
    assert "worker died 2 times" in reason, reason

    os.environ.pop("CTDIFF_FAULT_DIR")  # the fault is gone (monkeypatch restores it afterwards)
    again = _preprocess(_overrides(tmp_path))
    assert (again["ok"], again["quarantined"]) == (len(cases), 0)
    assert _served_cases(store_path, cases) == dict.fromkeys(ids, "ok")


# -- two writers of one case --------------------------------------------------------------------


def _volume(depth: int, seed: int) -> Volume:
    hu = np.random.default_rng(seed).integers(-1024, 2000, size=(depth, 16, 16)).astype(np.int16)
    return Volume(hu=hu, spacing_mm=(1.0, 0.7, 0.7), z_mm=np.arange(depth, dtype=float),
                  orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), origin_mm=(0.0, 0.0, 0.0))


def test_two_writers_of_one_case_race_harmlessly(tmp_path, monkeypatch):
    """The same task run twice at once (Dask re-ran it on a second worker while the first still
    ran): both stage the same output under the same key and move it in at the same moment.
    Neither fails, the case in place is whole, and nothing is left in staging."""
    store = CaseStore(tmp_path / "s.zarr")
    store.create()
    thick, thin = _volume(3, seed=1), _volume(12, seed=2)
    rounds = 30
    barrier = threading.Barrier(2, timeout=30)
    replace_dir = ctdiff.store.replace_dir
    first_calls: set = set()

    def in_step(source, target):  # both writers reach their first rename together
        if (threading.get_ident(), target) not in first_calls:
            first_calls.add((threading.get_ident(), target))
            barrier.wait()
        replace_dir(source, target)

    monkeypatch.setattr(ctdiff.store, "replace_dir", in_step)

    def writer(round_: int) -> None:
        store.write_native(f"c{round_}", {"thick": thick, "thin": thin}, f"k{round_}", {}, 4, 1)

    with ThreadPoolExecutor(2) as pool:
        for round_ in range(rounds):
            for future in [pool.submit(writer, round_) for _ in range(2)]:
                future.result(timeout=60)
    for round_ in range(rounds):
        assert store.native_key(f"c{round_}") == f"k{round_}"
        np.testing.assert_array_equal(store.read_native(f"c{round_}", "thin").hu, thin.hu)
    assert _staged(store.path) == []


def test_new_native_arrays_withdraw_the_case_made_from_the_old(tmp_path):
    """Decoding a case anew (new code or input) withdraws its resized entry first: killed between
    the two writes, the case is absent and redone, never an old entry over new arrays."""
    store = CaseStore(tmp_path / "s.zarr")
    store.create()
    old, new = _volume(12, seed=1), _volume(10, seed=2)
    entry = {"id": "c", "status": "ok", "reason": None, "category": "APE", "n_thick": 12, "n_thin": 12}
    store.write_native("c", {"thick": old, "thin": old}, "k-old", {}, 4, 1)
    store.write_case("c", {}, "case-old", entry, 4, 1)
    store.write_native("c", {"thick": old, "thin": old}, "k-old", {}, 4, 1)  # the same output: kept
    assert store.case_key("c") == "case-old"
    store.write_native("c", {"thick": new, "thin": new}, "k-new", {}, 4, 1)
    assert store.case_key("c") is None and store.manifest() == []
    assert store.native_key("c") == "k-new"


def test_staging_cleared_under_a_writer_is_never_moved_in(tmp_path, monkeypatch):
    """A run clearing staging while a straggler of an earlier run still writes there (Dask
    tasks outlive the flow run that submitted them): what the straggler writes afterwards
    would be half a case; it is refused, not moved into place."""
    store = CaseStore(tmp_path / "s.zarr")
    store.create()
    volume = _volume(12, seed=1)
    write_volume = ctdiff.store._write_volume

    def cleared_midway(group, kind, array, *args):
        if kind == "thin":
            CaseStore(store.path).create()  # the other run starts
        write_volume(group, kind, array, *args)

    monkeypatch.setattr(ctdiff.store, "_write_volume", cleared_midway)
    with pytest.raises(OSError):
        store.write_native("c", {"thick": volume, "thin": volume}, "k", {}, 4, 1)
    assert store.native_key("c") is None
    assert _staged(store.path) == []


# -- a store that is read-only or full ----------------------------------------------------------


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES])
def test_a_refusing_filesystem_is_not_retried(code):
    from prefect.states import Failed

    from tasks.training import is_transient, retry_training

    for retry in (is_transient, retry_training):
        assert not retry(None, None, Failed(data=OSError(code, os.strerror(code))))
        assert retry(None, None, Failed(data=OSError(errno.EIO, "Input/output error")))


@pytest.fixture(scope="module")
def mount_namespace(tmp_path_factory):
    """The command prefix of a private mount namespace (unshare; mapped root when not root), where
    test mounts vanish with the process; skips where mounting is not permitted."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) is not installed")
    prefix = [unshare, "-m"] if os.geteuid() == 0 else [unshare, "-rm"]
    point = tmp_path_factory.mktemp("mount-probe")
    probe = subprocess.run([*prefix, "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(point)],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"mounting is not permitted here: {probe.stderr.strip()}")
    return prefix


def _ctdiff_after_mounting(prefix: list[str], mounts: list[str], argv: list[str], after: list[str] = (),
                           timeout_s: float = FLOW_TIMEOUT_S) -> subprocess.CompletedProcess:
    """`ctdiff ARGV` in a private mount namespace, after the shell lines `mounts` and before
    `after` (which may copy results out); exit 97 if a mount fails."""
    cli = shlex.join([sys.executable, "-m", "flows.cli", *argv])
    script = "\n".join([*(f"{line} || exit 97" for line in mounts), cli, "rc=$?", *after, "exit $rc"])
    env = {**os.environ}
    from prefect.settings import get_current_settings

    api_url = get_current_settings().api.url
    if api_url:
        env["PREFECT_API_URL"] = str(api_url)  # the test server, not an embedded one per run
    result = subprocess.run([*prefix, "sh", "-c", script], capture_output=True, text=True,
                            timeout=timeout_s, env=env, cwd=Path(__file__).parent.parent)
    assert result.returncode != 97, result.stderr
    return result


def _one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.parametrize("folder", ["store", "work"])
def test_read_only_folder_is_one_line_and_writes_nothing(folder, cases, tmp_path, mount_namespace):
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    store_path = readonly if folder == "store" else tmp_path / "store.zarr"
    argv = ["preprocess", *(f"--set={o}" for o in _overrides(tmp_path, store_path))]
    if folder == "work":
        argv.append(f"--set=paths.work={readonly}")
    mounts = [f"mount --bind {readonly} {readonly}", f"mount -o remount,bind,ro {readonly}"]
    result = _ctdiff_after_mounting(mount_namespace, mounts, argv, timeout_s=120)
    what = {"store": "the case store", "work": "the work folder"}[folder]
    assert result.returncode == 2, result.stderr
    assert _one_error_line(result.stderr) == f"ctdiff: error: cannot write {what} {readonly}: read-only file system"
    assert list(readonly.iterdir()) == []
    assert not (tmp_path / "store.zarr").exists()


def test_full_store_is_one_line_and_writes_nothing(cases, tmp_path, mount_namespace):
    full = tmp_path / "full"
    full.mkdir()
    store_path = full / "store.zarr"
    mounts = [f"mount -t tmpfs -o size=1m tmpfs {full}", f"(cat /dev/zero > {full}/filler 2>/dev/null; true)"]
    after = [f"ls -A {full} > {tmp_path / 'listing'}"]
    argv = ["preprocess", *(f"--set={o}" for o in _overrides(tmp_path, store_path))]
    result = _ctdiff_after_mounting(mount_namespace, mounts, argv, after, timeout_s=120)
    assert result.returncode == 2, result.stderr
    expected = f"ctdiff: error: cannot write the case store {store_path}: no space left on device"
    assert _one_error_line(result.stderr) == expected
    assert (tmp_path / "listing").read_text().split() == ["filler"]


@pytest.mark.slow
def test_store_filling_up_stops_the_run_with_one_line(cases, tmp_path, prefect_harness, mount_namespace):
    """The store's filesystem fills up in the middle of the run: the run stops at once (the cases
    are not to blame: none is quarantined for it), with one line naming the store and the
    problem, exit 1; no case is half-written and staging is cleared."""
    full = tmp_path / "full"
    full.mkdir()
    store_path = full / "store.zarr"
    snapshot = tmp_path / "snapshot"
    room_kib = 16  # the probe and the store's root fit, the cases do not
    mounts = [f"mount -t tmpfs -o size=1m tmpfs {full}",
              f"head -c {1024 - room_kib}k /dev/zero > {full}/filler"]
    after = [f"cp -a {full} {snapshot}"]
    argv = ["preprocess", *(f"--set={o}" for o in _overrides(tmp_path, store_path, n_workers=1))]
    result = _ctdiff_after_mounting(mount_namespace, mounts, argv, after)
    assert result.returncode == 1, result.stderr
    # The run's Prefect log comes first on stderr (with the flow engine's tracebacks); the
    # command ends with one line of its own.
    lines = result.stderr.strip().splitlines()
    expected = f"ctdiff: preprocess failed: cannot write the case store {store_path}: no space left on device"
    assert lines[-1] == expected, result.stderr
    assert [line for line in lines if line.startswith("ctdiff:")] == [expected]
    assert "Retry 1/1" not in result.stderr  # a full disk is not retried (preprocess.retries=1)
    snapshot_store = snapshot / "store.zarr"
    assert (snapshot_store / "zarr.json").is_file()  # the store was created: it filled up later
    assert set(_served_cases(snapshot_store, cases).values()) <= {"ok"}
    assert _staged(snapshot_store) == []
