import numpy as np
import pytest

from ctdiff.diffusion import condition, latent_z
from ctdiff.latent_windows import LatentWindowSampler
from ctdiff.latents import LatentStore

WINDOW = (40.0, 400.0)
SCALE = 0.5


def _store(tmp_path, factors=(1, 8, 8)) -> LatentStore:
    """Two cases of random latents: "long" (12 thin latent slices, 3 mm -> 1 mm), "short" (3)."""
    store = LatentStore(tmp_path / "latents", "vae0")
    store.create("slice-kl-tiny", factors, WINDOW)
    rng = np.random.default_rng(0)
    fz = factors[0]
    for case_id, n_thin in (("long", 12 * fz), ("short", 3 * fz)):
        thin_z = 100.0 + np.arange(n_thin, dtype=float)  # 1 mm
        thick_z = thin_z.reshape(-1, 3).mean(axis=1)  # 3 mm slabs
        thin = rng.normal(size=(4, n_thin // fz, 5, 6)).astype(np.float32)
        thick = rng.normal(size=(4, -(-len(thick_z) // fz), 5, 6)).astype(np.float32)
        attrs = {"key": case_id, "thin": {"z_mm": list(thin_z), "spacing_mm": [1.0, 8.0, 8.0]},
                 "thick": {"z_mm": list(thick_z), "spacing_mm": [3.0, 8.0, 8.0]}}
        store.write_case(case_id, {"thick": thick, "thin": thin}, attrs)
    store.set_scale_factor(SCALE)
    return store


def _full_condition(store: LatentStore, case_id: str) -> np.ndarray:
    attrs, fz = store.case_attrs(case_id), store.root_attrs()["factors"][0]
    return condition(store.read(case_id, "thick"), latent_z(np.array(attrs["thick"]["z_mm"]), fz),
                     latent_z(np.array(attrs["thin"]["z_mm"]), fz))


def _find_offset(window: np.ndarray, thin: np.ndarray) -> int:
    depth = window.shape[1]
    matches = [z0 for z0 in range(thin.shape[1] - depth + 1) if np.allclose(window, thin[:, z0 : z0 + depth])]
    assert len(matches) == 1
    return matches[0]


@pytest.mark.parametrize("factors", [(1, 8, 8), (4, 4, 4)])
def test_windows_are_scaled_latents_with_their_condition(tmp_path, factors):
    store = _store(tmp_path, factors)
    sampler = LatentWindowSampler(store, ["long"], 4, None, 2, SCALE, np.random.default_rng(1))
    x0, cond, mask = sampler.sample(6)
    assert x0.shape == cond.shape == (6, 4, 4, 6, 6) and mask.shape == (6, 1, 4, 6, 6)  # h 5 -> 6
    thin, full_cond = store.read("long", "thin"), _full_condition(store, "long")
    offsets = set()
    for b in range(6):
        z0 = _find_offset(x0[b, :, :, :5, :] / SCALE, thin)
        offsets.add(z0)
        # The condition read from the bracketing thick slices equals the whole-volume one.
        np.testing.assert_allclose(cond[b, :, :, :5] / SCALE, full_cond[:, z0 : z0 + 4], rtol=0, atol=1e-5)
    assert len(offsets) > 1
    assert np.all(mask[:, :, :, :5] == 1) and np.all(mask[:, :, :, 5:] == 0)
    assert np.all(x0[:, :, :, 5:] == 0) and np.all(cond[:, :, :, 5:] == 0)


def test_short_cases_are_padded_and_masked(tmp_path):
    store = _store(tmp_path)
    sampler = LatentWindowSampler(store, ["short"], 8, None, 2, SCALE, np.random.default_rng(0))
    x0, cond, mask = sampler.sample(2)
    np.testing.assert_allclose(x0[0, :, :3, :5] / SCALE, store.read("short", "thin"), rtol=0, atol=1e-6)
    assert np.all(mask[:, :, :3, :5] == 1) and mask.sum() == 2 * 3 * 5 * 6
    assert np.all(x0[:, :, 3:] == 0) and np.all(cond[:, :, 3:] == 0)


def test_latent_patches_crop_in_plane(tmp_path):
    store = _store(tmp_path)
    sampler = LatentWindowSampler(store, ["long", "short"], 4, 4, 2, SCALE, np.random.default_rng(0))
    x0, cond, mask = sampler.sample(8)
    assert x0.shape == (8, 4, 4, 4, 4) and mask.shape == (8, 1, 4, 4, 4)
    assert np.all(mask[:, :, :3] == 1)  # every case is at least 3 deep and 5 x 6 wide
    big = LatentWindowSampler(store, ["long"], 4, 8, 2, SCALE, np.random.default_rng(0)).sample(1)[2]
    assert big.shape == (1, 1, 4, 8, 8) and big[0, 0, 0].sum() == 5 * 6  # padded beyond the plane


def test_same_seed_same_windows_and_state_replays(tmp_path):
    store = _store(tmp_path)
    a = LatentWindowSampler(store, ["long", "short"], 4, 4, 2, SCALE, np.random.default_rng(7))
    b = LatentWindowSampler(store, ["long", "short"], 4, 4, 2, SCALE, np.random.default_rng(7), cache_bytes=0)
    state = a.rng_state()
    first = a.sample(5)
    for x, y in zip(first, b.sample(5)):  # a one-case cache re-reads the store: same windows
        np.testing.assert_array_equal(x, y)
    a.set_rng_state(state)
    for x, y in zip(first, a.sample(5)):
        np.testing.assert_array_equal(x, y)


def test_no_cases_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="encode the train split"):
        LatentWindowSampler(_store(tmp_path), [], 4, None, 2, SCALE, np.random.default_rng(0))
