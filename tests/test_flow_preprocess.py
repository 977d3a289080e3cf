"""The `preprocess` flow end to end on synthetic cases mixed with broken ones."""

import io
import time
import zipfile
from datetime import datetime, timezone

import numpy as np
import pydicom
import pytest

from ctdiff.store import CaseStore
from ctdiff.synth import PHI_MARKERS, SynthSpec, synthesize

pytestmark = pytest.mark.slow

SPEC = SynthSpec(n_cases=4, size=32, n_thin=20, seed=3)


def _dicom_members(path):
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            data = zf.read(info)
            yield info, data, pydicom.dcmread(io.BytesIO(data))


def _rewrite_zip(source, target, keep):
    """Copy a case ZIP keeping members for which keep(index, dataset) is true."""
    members = list(_dicom_members(source))
    with zipfile.ZipFile(target, "w") as out:
        for index, (info, data, ds) in enumerate(members):
            if keep(index, ds):
                out.writestr(info, data)


def _thin_indices(path):
    return [i for i, (_, _, ds) in enumerate(_dicom_members(path))
            if ds.get("Modality") == "CT" and float(ds.get("SliceThickness", 0)) == SPEC.thin_mm
            and "LOCALIZER" not in ds.ImageType]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("cases")
    good = synthesize(root, SPEC)
    source = good[0]
    broken = root / "non-APE"
    (broken / "garbage.zip").write_bytes(np.random.default_rng(0).bytes(4096))
    thin = _thin_indices(source)
    middle = sorted(thin)[len(thin) // 2]
    _rewrite_zip(source, broken / "gap.zip", lambda i, ds: i != middle)
    _rewrite_zip(source, broken / "thick_only.zip", lambda i, ds: i not in thin)
    with zipfile.ZipFile(broken / "escape.zip", "w") as zf:
        zf.writestr("../evil.dcm", b"x")
    return root, good


def _independent_thin_hu(path):
    """The thin series straight from pydicom: sort by z, apply the modality LUT, crop."""
    slices = [ds for _, _, ds in _dicom_members(path)
              if ds.get("Modality") == "CT" and "LOCALIZER" not in ds.ImageType
              and float(ds.SliceThickness) == SPEC.thin_mm]
    thick_z = sorted(float(ds.ImagePositionPatient[2]) for _, _, ds in _dicom_members(path)
                     if ds.get("Modality") == "CT" and float(ds.get("SliceThickness", 0)) == SPEC.thick_mm)
    slices.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    z = np.array([float(ds.ImagePositionPatient[2]) for ds in slices])
    keep = (z >= thick_z[0] - SPEC.thick_mm / 2) & (z < thick_z[-1] + SPEC.thick_mm / 2)
    hu = np.stack([pydicom.pixels.apply_modality_lut(ds.pixel_array, ds) for ds in slices])
    return np.maximum(hu[keep], -1024).astype(np.int16), z[keep]  # padding → air


def _count_cached_case_tasks():
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter, TaskRunFilter, TaskRunFilterName, TaskRunFilterState, TaskRunFilterStateName,
    )
    from prefect.client.schemas.sorting import TaskRunSort

    # A deployment or flow filter, even empty, joins on them and drops runs outside deployments.
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            task_run_filter=TaskRunFilter(
                name=TaskRunFilterName(like_="ingest-"), state=TaskRunFilterState(name=TaskRunFilterStateName(any_=["Cached"]))
            ),
            flow_run_filter=FlowRunFilter(),
            sort=TaskRunSort.EXPECTED_START_TIME_DESC, limit=200, offset=0,
        )
    return len(runs)


def _wait_for_cached_case_tasks(expected: int, timeout_s: float = 60.0) -> int:
    """The count of Cached case task runs once it reaches `expected` (or at the timeout):
    the server records task runs from the client's events, a moment after the flow returns."""
    deadline = time.monotonic() + timeout_s
    while (count := _count_cached_case_tasks()) < expected and time.monotonic() < deadline:
        time.sleep(0.5)
    return count


def _mtimes(store_path, level):
    return {p.parent.name: p.stat().st_mtime_ns for p in (store_path / level).glob("*/zarr.json")}


def test_preprocess_flow(cases, tmp_path, prefect_harness, caplog):
    from flows.preprocess import preprocess

    root, good = cases
    store_path = tmp_path / "store.zarr"
    overrides = [f"paths.input={root}", f"paths.store={store_path}", "preprocess.resolution=null",
                 "preprocess.dask.n_workers=1", "preprocess.retries=0"]
    overrides.append(f"paths.work={tmp_path / 'work'}")
    started = datetime.now(timezone.utc)  # the Prefect server is shared with other flow tests
    result = preprocess(config=None, overrides=overrides)
    assert {k: result[k] for k in ("store", "ok", "quarantined")} == {"store": str(store_path), "ok": 4, "quarantined": 4}
    assert [p.endswith(".png") for p in result["previews"]] == [True] * 3
    assert all((tmp_path / "work" / "previews" / f"{p.stem}.png").stat().st_size > 1000 for p in good[:3])

    store = CaseStore(store_path)
    manifest = {e["id"]: e for e in store.manifest()}
    assert {i: e["status"] for i, e in manifest.items() if e["status"] == "ok"}.keys() == {p.stem for p in good}
    assert manifest["garbage"]["reason"] == "corrupt zip"
    assert manifest["gap"]["reason"].startswith("missing slice at z=")
    assert manifest["gap"]["reason"].endswith("in thin series")
    assert manifest["thick_only"]["reason"].startswith("no thin series")
    assert manifest["escape"]["reason"].startswith("unsafe path in zip")
    assert sorted(e["split"] for e in manifest.values() if e["status"] == "ok") == ["test", "train", "train", "val"]

    # Every good case is exact: HU and positions as an independent pydicom reading gives them.
    for path in good:
        hu, z_mm = _independent_thin_hu(path)
        thin = store.read(path.stem, "thin")
        np.testing.assert_array_equal(thin.hu, hu)
        np.testing.assert_allclose(thin.z_mm, np.sort(z_mm))
        assert thin.shape[0] == SPEC.n_thin
        assert store.read(path.stem, "thick").shape[0] == SPEC.n_thin // SPEC.ratio

    # Nothing patient-identifying anywhere in the store, the logs or the persisted results.
    stored = b"".join(p.read_bytes() for p in store_path.rglob("*") if p.is_file())
    results = b"".join(p.read_bytes() for p in prefect_harness.rglob("*") if p.is_file())
    for marker in PHI_MARKERS:
        assert marker.encode() not in stored
        assert marker.encode() not in results
        assert marker not in caplog.text

    # The Prefect UI gets the manifest as a table artifact, with reasons; neither it nor the
    # run logs (from the Dask workers too) hold patient data.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, TaskRunFilter
    from prefect.client.schemas.filters import LogFilter, LogFilterTimestamp
    from prefect.client.schemas.sorting import ArtifactSort, LogSort

    with get_client(sync_client=True) as client:
        # Prefect 3.8's sync client sends null for every argument left out, which the API refuses.
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["preprocess-cases", "preprocess-summary"])),
            flow_run_filter=FlowRunFilter(), task_run_filter=TaskRunFilter(),
            sort=ArtifactSort.CREATED_DESC, limit=10, offset=0,
        )
        logs = client.read_logs(log_filter=LogFilter(timestamp=LogFilterTimestamp(after_=started)),
                                limit=200, offset=0, sort=LogSort.TIMESTAMP_ASC)
    log_text = "\n".join(log.message for log in logs)
    assert "found 8 cases" in log_text and "Finished in state" in log_text
    texts: dict[str, str] = {}
    for artifact in artifacts:  # newest first: this run's, not an earlier test's
        texts.setdefault(artifact.key, str(artifact.data))
    assert set(texts) == {"preprocess-cases", "preprocess-summary"}
    table = texts["preprocess-cases"]
    assert "corrupt zip" in table and all(p.stem in table for p in good)
    for marker in PHI_MARKERS:
        assert all(marker not in t for t in texts.values())
        assert marker not in log_text

    # A second run does no work: every case's task is a Prefect cache hit, no group is rewritten.
    native, cases_before = _mtimes(store_path, "native"), _mtimes(store_path, "cases")
    cached_before = _count_cached_case_tasks()
    assert preprocess(config=None, overrides=overrides)["ok"] == 4
    cached = _wait_for_cached_case_tasks(cached_before + 8)
    assert cached - cached_before == 8  # the ok cases and those quarantined for their data
    assert _mtimes(store_path, "native") == native
    assert _mtimes(store_path, "cases") == cases_before

    # A new resolution re-runs only the resize: the decoded native arrays are untouched.
    preprocess(config=None, overrides=[*overrides, "preprocess.resolution=16"])
    assert _mtimes(store_path, "native") == native
    assert store.read(good[0].stem, "thin").shape == (SPEC.n_thin, 16, 16)
