import numpy as np
import pytest
from scipy.stats import wasserstein_distance

from ctdiff.interpolate import interpolate_z
from ctdiff.metrics import histogram_w1_hu, score
from ctdiff.residual import (
    RESIDUAL_GAIN, base_condition, base_volume, compose, condition_channels, residual_target, vae_base,
)


def test_base_is_the_clipped_classical_baseline():
    rng = np.random.default_rng(0)
    thick = rng.uniform(-0.2, 1.2, (6, 4, 5)).astype(np.float32)
    thick_z, thin_z = np.arange(6) * 5.0, np.linspace(0, 25, 26)
    base = base_volume(thick, thick_z, thin_z, "cubic")
    np.testing.assert_allclose(base, np.clip(interpolate_z(thick, thick_z, thin_z, "cubic"), 0, 1))
    with pytest.raises(ValueError, match="no base volume"):
        base_volume(thick, thick_z, thin_z, "none")
    with pytest.raises(ValueError, match="diffusion.base"):
        base_volume(thick, thick_z, thin_z, "spline")


def test_residual_round_trip_is_exact_inside_the_window():
    rng = np.random.default_rng(1)
    thin, base = rng.uniform(0, 1, (2, 5, 8, 8)).astype(np.float32)
    residual = residual_target(thin, base)
    np.testing.assert_allclose(residual, RESIDUAL_GAIN * (thin - base), rtol=1e-6)
    np.testing.assert_allclose(compose(base, residual), thin, atol=1e-6)
    # zero residual gives the base back: the model starts from the classical baseline
    np.testing.assert_array_equal(compose(base, np.zeros_like(base)), base)


def test_base_condition_folds_blocks_without_loss():
    base = np.random.default_rng(2).uniform(0, 1, (3, 8, 12)).astype(np.float32)
    cond = base_condition(base, (1, 4, 4))
    assert cond.shape == (condition_channels((1, 4, 4)), 3, 2, 3) == (16, 3, 2, 3)
    # channel (y, x) of latent voxel (d, i, j) is pixel (d, 4i + y, 4j + x), mapped to [-1, 1]
    for y, x, d, i, j in [(0, 0, 0, 0, 0), (3, 1, 2, 1, 2), (2, 3, 1, 0, 1)]:
        assert cond[4 * y + x, d, i, j] == pytest.approx(2 * base[d, 4 * i + y, 4 * j + x] - 1)
    # sizes that are not multiples are edge-padded, like the encoder's input
    odd = base_condition(base[:, :7, :10], (1, 4, 4))
    assert odd.shape == (16, 3, 2, 3)
    assert odd[4 * 3 + 3, 0, 1, 2] == pytest.approx(2 * base[0, 6, 9] - 1)


def test_checkpoints_from_before_the_residual_formulation_are_whole_image_vaes():
    assert vae_base({"kind": "vae"}) == "none"
    assert vae_base({"kind": "vae", "target": {"base": "cubic", "residual_gain": 8.0}}) == "cubic"


def test_histogram_distance_matches_scipy_and_punishes_blur():
    rng = np.random.default_rng(3)
    truth = np.clip(rng.normal(0.5, 0.2, (4, 16, 16)), 0, 1).astype(np.float32)
    truth[:, :4] = 0.0  # air: outside the body mask
    noisy = np.clip(truth + rng.normal(0, 0.05, truth.shape), 0, 1).astype(np.float32)
    mask = (truth > 0) | (noisy > 0)
    expected = wasserstein_distance(noisy[mask], truth[mask]) * 400.0
    assert histogram_w1_hu(noisy, truth, 400.0) == pytest.approx(expected, rel=1e-9)
    blurred = truth.copy()
    blurred[:, 4:] = truth[:, 4:].mean()  # right on average, no contrast
    assert histogram_w1_hu(blurred, truth, 400.0) > 5 * histogram_w1_hu(noisy, truth, 400.0)
    assert histogram_w1_hu(truth, truth, 400.0) == 0.0
    assert score(noisy, truth, width_hu=400.0)["hist_w1_hu"] == pytest.approx(expected, rel=1e-9)
