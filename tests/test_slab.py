import numpy as np
import pytest

from ctdiff.slab import project_to_slabs, slab_index


def _slabs(n_thick=4, ratio=5, thick_mm=5.0):
    thick_z = np.arange(n_thick) * thick_mm
    thin_z = thick_z[0] - thick_mm / 2 + (np.arange(n_thick * ratio) + 0.5) * thick_mm / ratio
    return thick_z, thin_z


def test_slab_index_assigns_each_thin_slice_to_the_slab_covering_it():
    thick_z, thin_z = _slabs()
    np.testing.assert_array_equal(slab_index(thick_z, thin_z), np.repeat(np.arange(4), 5))
    # outside every slab: -1; a centre on a shared border belongs to the upper slab
    np.testing.assert_array_equal(slab_index(thick_z, np.array([-3.0, 2.5, 17.6])), [-1, 1, -1])


def test_projection_is_exact_on_a_constructed_volume():
    rng = np.random.default_rng(0)
    thick_z, thin_z = _slabs()
    truth = rng.uniform(0.2, 0.8, (20, 6, 7)).astype(np.float32)
    thick = truth.reshape(4, 5, 6, 7).mean(axis=1)  # box slabs, all inside the window
    guess = np.clip(truth + rng.normal(0, 0.05, truth.shape).astype(np.float32), 0, 1)
    projected = project_to_slabs(guess, thick, thick_z, thin_z)
    # every slab now averages to its thick slice ...
    np.testing.assert_allclose(projected.reshape(4, 5, 6, 7).mean(axis=1), thick, atol=1e-6)
    # ... by moving each slab's slices by one offset (detail within a slab untouched) ...
    moved = (projected - guess).reshape(4, 5, 6, 7)
    np.testing.assert_allclose(moved, np.broadcast_to(moved[:, :1], moved.shape), atol=1e-6)
    # ... so it is the orthogonal projection: closer to the truth, which it leaves unchanged
    assert np.square(projected - truth).sum() < np.square(guess - truth).sum()
    np.testing.assert_allclose(project_to_slabs(truth, thick, thick_z, thin_z), truth, atol=1e-6)


def test_saturated_slabs_are_left_alone():
    thick_z, thin_z = _slabs(n_thick=2)
    thick = np.zeros((2, 2, 2), np.float32)
    thick[0] = 0.5
    thick[1] = 1.0  # at the window ceiling: the thin slices may hold anything above it
    guess = np.full((10, 2, 2), 0.7, np.float32)
    projected = project_to_slabs(guess, thick, thick_z, thin_z)
    np.testing.assert_allclose(projected[:5], 0.5, atol=1e-6)
    np.testing.assert_array_equal(projected[5:], guess[5:])


def test_projection_rejects_mismatched_shapes():
    thick_z, thin_z = _slabs()
    with pytest.raises(ValueError, match="one grid"):
        project_to_slabs(np.zeros((20, 4, 4)), np.zeros((4, 5, 4)), thick_z, thin_z)
    with pytest.raises(ValueError, match="one position per slice"):
        project_to_slabs(np.zeros((19, 4, 4)), np.zeros((4, 4, 4)), thick_z, thin_z)
