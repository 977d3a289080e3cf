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
    import zipfile

    ref, store = one_case

    def flaky_read(self, *args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(zipfile.ZipFile, "read", flaky_read)
    with pytest.raises(OSError) as info:
        decode_case(ref, store)
    assert info.value.errno == errno.EIO
    assert store.manifest() == []
