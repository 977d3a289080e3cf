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
