import numpy as np
import pytest

from ctdiff.errors import CaseError
from ctdiff.preprocess import align, resize_inplane
from ctdiff.volume import Volume


def _vol(z_mm, size=8, spacing=(1.0, 1.0), origin_xy=(0.0, 0.0), hu=None):
    z_mm = np.asarray(z_mm, dtype=float)
    dz = float(np.median(np.diff(z_mm))) if len(z_mm) > 1 else 1.0
    if hu is None:
        hu = np.broadcast_to((z_mm * 10).astype(np.int16)[:, None, None], (len(z_mm), size, size)).copy()
    return Volume(hu=hu, spacing_mm=(dz, *spacing), z_mm=z_mm, origin_mm=(*origin_xy, float(z_mm[0])))


def test_align_crops_thin_to_the_thick_slab_extent():
    thick = _vol([0.0, 5.0, 10.0])  # slabs cover [-2.5, 12.5)
    thin = _vol(np.arange(-6.0, 16.0, 1.0))
    _, cropped = align(thick, thin)
    np.testing.assert_array_equal(cropped.z_mm, np.arange(-2.0, 13.0, 1.0))
    assert cropped.shape[0] == 15  # 3 thick slices x 5
    np.testing.assert_array_equal(cropped.hu[:, 0, 0], (np.arange(-2.0, 13.0) * 10).astype(np.int16))
    assert cropped.origin_mm[2] == -2.0


def test_align_refuses_a_thin_series_that_does_not_cover():
    thick = _vol([0.0, 5.0, 10.0])
    thin = _vol(np.arange(-2.0, 6.0, 1.0))
    with pytest.raises(CaseError, match="does not cover"):
        align(thick, thin)


def test_resize_is_identity_for_native_grid():
    vol = _vol([0.0, 1.0], size=8)
    assert resize_inplane(vol, None) is vol
    assert resize_inplane(vol, 8) is vol


def test_resize_keeps_physical_positions():
    """HU linear in patient x/y must read the same at each new pixel centre (interior)."""
    size, new = 64, 32
    spacing = (0.5, 0.75)  # (dy, dx)
    origin = (-20.0, 13.0)  # x, y of the first pixel centre
    cols = origin[0] + spacing[1] * np.arange(size)
    rows = origin[1] + spacing[0] * np.arange(size)
    plane = 3.0 * cols[None, :] - 2.0 * rows[:, None]
    hu = np.stack([plane, plane]).round().astype(np.int16)
    vol = _vol([0.0, 1.0], size=size, spacing=spacing, origin_xy=origin, hu=hu)
    out = resize_inplane(vol, new)
    dz, dy, dx = out.spacing_mm
    assert (dy, dx) == pytest.approx((spacing[0] * 2, spacing[1] * 2))
    x = out.origin_mm[0] + dx * np.arange(new)
    y = out.origin_mm[1] + dy * np.arange(new)
    expected = 3.0 * x[None, :] - 2.0 * y[:, None]
    interior = (slice(2, -2), slice(2, -2))
    np.testing.assert_allclose(out.hu[0][interior], expected[interior], atol=1.0)
    assert out.hu.dtype == np.int16


def test_resize_2x_is_the_triangle_filter():
    """At exactly 2x, antialiased bilinear is the separable [1, 3, 3, 1] / 8 filter."""
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 1000, size=(2, 32, 32)).astype(np.int16)
    out = resize_inplane(_vol([0.0, 1.0], size=32, hu=hu), 16)
    taps = np.array([1.0, 3.0, 3.0, 1.0]) / 8
    x = hu.astype(np.float64)
    rows = sum(taps[k] * x[:, 2 * np.arange(1, 15) - 1 + k, :] for k in range(4))  # (2, 14, 32)
    both = sum(taps[k] * rows[:, :, 2 * np.arange(1, 15) - 1 + k] for k in range(4))  # (2, 14, 14)
    np.testing.assert_allclose(out.hu[:, 1:15, 1:15], both, atol=0.51)


# -- case steps against a store ------------------------------------------------------------------

import ctdiff.store  # noqa: E402
from ctdiff.cases import discover_cases  # noqa: E402
from ctdiff.preprocess import decode_case, resize_case  # noqa: E402
from ctdiff.store import CaseStore  # noqa: E402
from ctdiff.synth import SynthSpec, synthesize  # noqa: E402


class _Killed(BaseException):
    """Stands for SIGKILL / pod eviction in the middle of a write."""


@pytest.fixture
def one_case(tmp_path):
    synthesize(tmp_path / "in", SynthSpec(n_cases=1, size=16, n_thin=10))
    (ref,) = discover_cases(tmp_path / "in")
    store = CaseStore(tmp_path / "s.zarr")
    store.create()
    return ref, store


def test_steps_are_idempotent(one_case):
    ref, store = one_case
    first = decode_case(ref, store)
    assert first["cached"] is False and first["status"] == "ok"
    assert resize_case(ref, store, 8)["cached"] is False
    assert decode_case(ref, store)["cached"] is True
    again = resize_case(ref, store, 8)
    assert again["cached"] is True and again["n_thin"] == 10 and again["n_thick"] == 2
    assert resize_case(ref, store, 4)["cached"] is False  # a new grid is a new output
    assert store.read(ref.id, "thin").shape == (10, 4, 4)


def test_case_killed_while_writing_is_redone(one_case, monkeypatch):
    ref, store = one_case

    def killed(*args, **kwargs):
        raise _Killed

    monkeypatch.setattr(ctdiff.store, "replace_dir", killed)
    with pytest.raises(_Killed):
        decode_case(ref, store)
    monkeypatch.undo()
    assert store.native_key(ref.id) is None and store.manifest() == []
    store.create()  # the next run starts by clearing staging
    assert not any((store.path / ".staging").glob("*"))
    assert decode_case(ref, store)["cached"] is False
    assert resize_case(ref, store, None)["status"] == "ok"
    assert [e["status"] for e in store.manifest()] == ["ok"]


def test_bad_case_is_quarantined_once(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "broken.zip").write_bytes(b"PK\x03\x04 not really a zip")
    (ref,) = discover_cases(tmp_path / "in")
    store = CaseStore(tmp_path / "s.zarr")
    store.create()
    first = decode_case(ref, store)
    assert (first["status"], first["reason"], first["cached"]) == ("quarantined", "corrupt zip", False)
    second = decode_case(ref, store)
    assert (second["status"], second["cached"]) == ("quarantined", True)
    (entry,) = store.manifest()
    assert entry["status"] == "quarantined" and entry["reason"] == "corrupt zip"


def test_storage_errors_propagate_for_retry(one_case, monkeypatch):
    """EIO from a network filesystem is not the case's fault: raised for a retry, not quarantined."""
    import errno

    from ctdiff import archive

    ref, store = one_case

    def flaky_read(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(archive, "_read_member", flaky_read)
    with pytest.raises(OSError) as info:
        decode_case(ref, store)
    assert info.value.errno == errno.EIO
    assert store.manifest() == []


def _streaming_case(tmp_path, rng, size=96):
    """A case whose thin series runs 3 slices past the thick extent at each end; and its HU."""
    from dicom_fixtures import ct_series, stored_volume
    from pydicom.uid import generate_uid

    study = generate_uid()
    thick = stored_volume(rng, (8, size, size), False)
    thin = stored_volume(rng, (46, size, size), False)  # z -5..40; the thick slabs cover -2..37
    thin_members = ct_series(thin, np.arange(-5.0, 41.0), study_uid=study)
    members = ct_series(thick, np.arange(8) * 5.0, study_uid=study) + thin_members
    return members, thin_members, (thick.nbytes + thin.nbytes)


def test_decode_streams_the_case_into_the_store(tmp_path):
    """The store holds exactly `read_case` + `align`, written without the whole volume in memory."""
    import tracemalloc

    from dicom_fixtures import write_zip

    from ctdiff.cases import CaseRef
    from ctdiff.dicom import read_case

    rng = np.random.default_rng(3)
    members, _, raw_bytes = _streaming_case(tmp_path, rng, size=192)
    path = write_zip(tmp_path / "c.zip", members, rng, stored=True)
    ref = CaseRef(id="c", path=str(path), category="")
    warm = CaseStore(tmp_path / "warm.zarr")  # first use imports codecs: not the case's memory
    warm.create()
    decode_case(ref, warm, chunk_slices=2)
    store = CaseStore(tmp_path / "s.zarr")
    store.create()
    tracemalloc.start()
    try:
        assert decode_case(ref, store, chunk_slices=2)["status"] == "ok"
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    expected = dict(zip(("thick", "thin"), align(*(lambda p: (p.thick, p.thin))(read_case(path)))))
    for kind, volume in expected.items():
        stored = store.read_native(ref.id, kind)
        np.testing.assert_array_equal(stored.hu, volume.hu)
        np.testing.assert_array_equal(stored.z_mm, volume.z_mm)
        assert stored.origin_mm == volume.origin_mm and stored.spacing_mm == volume.spacing_mm
    assert store.native_shape(ref.id, "thin") == (40, 192, 192)
    # The members' bytes and a few chunks; `read_case` + write needs ~2x (datasets + volume).
    assert peak < 1.5 * raw_bytes, peak / raw_bytes  # measured 1.3; read_case alone 2.1
    entry = resize_case(ref, store, None)  # native grid: the entry comes from array metadata
    assert (entry["n_thin"], entry["n_thick"], entry["shape_hw"]) == (40, 8, [192, 192])
    assert entry["spacing_thin_mm"] == list(expected["thin"].spacing_mm)


def test_decode_error_mid_write_quarantines_and_leaves_nothing(tmp_path):
    """A slice that fails to decode after the first chunks were written: the staged group goes,
    the case is quarantined with the reason; a damaged slice outside the thick extent is never
    decoded and does not matter."""
    from dicom_fixtures import write_zip

    from ctdiff.cases import CaseRef

    rng = np.random.default_rng(4)
    members, thin_members, _ = _streaming_case(tmp_path, rng, size=32)
    store = CaseStore(tmp_path / "s.zarr")
    store.create()
    inside, outside = thin_members[30], thin_members[1]  # z = 25 and z = -4
    for name, damaged, status in (("in", inside, "quarantined"), ("out", outside, "ok")):
        case_members = [m[:-700] if m is damaged else m for m in members]  # truncated pixel data
        path = write_zip(tmp_path / f"{name}.zip", case_members, rng)
        summary = decode_case(CaseRef(id=name, path=str(path), category=""), store)
        assert summary["status"] == status, summary
    assert summary["status"] == "ok" and store.native_shape("out", "thin") == (40, 32, 32)
    assert store.entry("in")["reason"] == "truncated DICOM in thin series, slice 30"
    assert store.native_key("in") is None and not any((store.path / ".staging").iterdir())
