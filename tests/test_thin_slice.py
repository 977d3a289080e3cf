"""ThinSliceModel's formulation plumbing, with random weights: what is tested here does not
depend on training (sample batching, the residual round trip, old checkpoints)."""

import numpy as np
import pytest
import torch

from ctdiff.autoencoder import CtAutoencoder
from ctdiff.config import load_config
from ctdiff.diffusion import build_unet
from ctdiff.latents import encode_volume
from ctdiff.residual import base_volume, condition_channels, residual_target
from ctdiff.thin_slice import ThinSliceModel

WINDOW = (40.0, 400.0)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(base: str = "cubic", slab: bool = False) -> ThinSliceModel:
    torch.manual_seed(0)
    vae = CtAutoencoder("slice-kl-4x-tiny").eval()
    config = load_config(None, [
        f"diffusion.base={base}", f"diffusion.slab_consistency={str(slab).lower()}", "diffusion.preset=tiny",
        "diffusion.window_slices=8", "diffusion.overlap_slices=2", "diffusion.sample_steps=3",
    ])
    cond_channels = condition_channels(vae.factors) if base != "none" else None
    unet = build_unet("tiny", 4, cond_channels).eval()
    return ThinSliceModel(unet, vae, config, scale_factor=2.0, thick_mm=5.0, thin_mm=1.0)


def _case(n_thick: int = 4, size: int = 16):
    rng = np.random.default_rng(0)
    thick = rng.uniform(0, 1, (n_thick, size, size)).astype(np.float32)
    thick_z = np.arange(n_thick) * 5.0
    thin_z = thick_z[0] - 2.0 + np.arange(5 * n_thick)
    return thick, thick_z, thin_z


def test_k_samples_batched_equal_k_single_runs():
    model = _model()
    thick, thick_z, thin_z = _case()
    batched = model.draw(thick, thick_z, thin_z, [3, 4, 5])
    assert batched.shape == (3, 20, 16, 16) and batched.dtype == np.float32
    singles = np.stack([model.draw(thick, thick_z, thin_z, [seed])[0] for seed in (3, 4, 5)])
    np.testing.assert_allclose(batched, singles, atol=1e-5)
    mean, std = model.predict_with_std(thick, thick_z, thin_z, seed=3, samples=3)
    np.testing.assert_allclose(mean, singles.mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(std, singles.std(axis=0), atol=1e-5)
    assert not np.allclose(singles[0], singles[1])  # the seeds do differ
    np.testing.assert_array_equal(model.predict(thick, thick_z, thin_z, seed=3, samples=3), mean)


def test_true_residual_latents_decode_to_the_vae_ceiling(monkeypatch):
    """Residual round trip: if sampling returned the latents of the true residual, the model
    would output exactly the redefined VAE ceiling, base + D(E(true residual))."""
    model = _model()
    thick, thick_z, thin_z = _case()
    truth = np.clip(base_volume(thick, thick_z, thin_z, "cubic")
                    + np.random.default_rng(1).normal(0, 0.03, (20, 16, 16)), 0, 1).astype(np.float32)
    true_latents = encode_volume(model.vae, residual_target(truth, base_volume(thick, thick_z, thin_z, "cubic")), 64)

    def oracle(*args, **kwargs):  # (K, C, d, h, w) scaled, as the sampler returns
        return torch.from_numpy(true_latents * model.scale_factor)[None]

    monkeypatch.setattr("ctdiff.thin_slice.sample_volume", oracle)
    drawn = model.draw(thick, thick_z, thin_z, [0])[0]
    np.testing.assert_allclose(drawn, model.ceiling(truth, thick, thick_z, thin_z), atol=1e-5)
    cubic = base_volume(thick, thick_z, thin_z, "cubic")
    assert np.abs(drawn - cubic).max() > 1e-3  # the ceiling is not just the base


def test_samples_are_moved_onto_the_thick_slabs(monkeypatch):
    model = _model(slab=True)
    thick, thick_z, thin_z = _case()

    def zero(sampler, model_fn, cond, *args, channels=None, **kwargs):  # (1, C, d, h, w)
        return torch.zeros((1, channels, *cond.shape[1:]))

    monkeypatch.setattr("ctdiff.thin_slice.sample_volume", zero)
    drawn = model.draw(thick, thick_z, thin_z, [0])  # before the slab step
    mean, std = model.finish(drawn, thick, thick_z, thin_z)
    assert std is None  # one sample: no spread, no uncertainty map
    slabs = mean.reshape(4, 5, 16, 16)
    # where neither the thick value nor any moved thin value is clipped, each slab averages to
    # its thick slice; without the slab step it does not
    inside = (thick > 0) & (thick < 1) & (slabs.min(axis=1) > 0) & (slabs.max(axis=1) < 1)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(slabs.mean(axis=1)[inside], thick[inside], atol=1e-5)
    unprojected = model.finish(drawn, thick, thick_z, thin_z, slab_consistency=False)[0].reshape(4, 5, 16, 16)
    assert np.abs(unprojected.mean(axis=1) - thick)[inside].max() > 0.01


def test_whole_image_formulation_still_samples():
    model = _model(base="none")
    thick, thick_z, thin_z = _case()
    out = model.predict(thick, thick_z, thin_z, seed=0)
    assert out.shape == (20, 16, 16) and 0 <= out.min() and out.max() <= 1
    assert model.base == "none" and model.latent_channels == 4
