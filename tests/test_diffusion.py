import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ctdiff.diffusion import PRESETS, build_unet, condition, latent_z


def test_tiny_unet_maps_latent_and_condition_to_latent_channels():
    torch.manual_seed(0)
    unet = build_unet("tiny", latent_channels=4)
    x = torch.randn(2, 8, 6, 4, 6)  # (B, 2C, D, H, W): depth and plane multiples of 2
    out = unet(x, torch.tensor([0.0, 999.5]))
    assert out.shape == (2, 4, 6, 4, 6)
    assert sum(p.numel() for p in unet.parameters()) == 436_148
    assert PRESETS["tiny"].size_multiple == 2 and PRESETS["full"].size_multiple == 4
    with pytest.raises(ValueError, match="tiny"):
        build_unet("huge", 4)


def test_full_preset_size():
    with torch.device("meta"):  # shapes only: no 660 MB of weights for a count
        unet = build_unet("full", latent_channels=4)
    assert sum(p.numel() for p in unet.parameters()) == 165_194_244
    assert unet.conv_in.conv.in_channels == 8 and unet.out[-1].conv.out_channels == 4


def test_latent_positions_are_slice_means_with_edge_copies():
    z = np.array([10.0, 11.0, 12.0, 13.0, 14.0])
    np.testing.assert_array_equal(latent_z(z, 1), z)
    np.testing.assert_array_equal(latent_z(z, 2), [10.5, 12.5, 14.0])  # last: slice 4 and its copy
    np.testing.assert_array_equal(latent_z(z, 4), [11.5, 14.0])
    np.testing.assert_array_equal(latent_z(z[:1], 4), [10.0])
    with pytest.raises(ValueError):
        latent_z(np.array([]), 1)
    with pytest.raises(ValueError):
        latent_z(z, 0)


def test_condition_interpolates_linearly_and_clamps_at_the_ends():
    # 3 mm -> 1 mm: thick slabs centred at 1, 4, 7 mm over thin slices at 0 .. 8 mm.
    thick_z = np.array([1.0, 4.0, 7.0])
    thin_z = np.arange(9.0)
    slope = np.array([1.0, -2.0])[:, None, None, None]  # per channel
    thick = (slope * thick_z[None, :, None, None] + 3.0) * np.ones((2, 3, 2, 3))  # (C, d, h, w) linear in z
    out = condition(thick.astype(np.float32), thick_z, thin_z)
    assert out.shape == (2, 9, 2, 3) and out.dtype == np.float32
    expected = slope * np.clip(thin_z, 1.0, 7.0)[None, :, None, None] + 3.0  # clamped outside [1, 7]
    np.testing.assert_allclose(out, np.broadcast_to(expected, out.shape), rtol=0, atol=1e-5)


def test_condition_is_trilinear_upsampling_on_an_aligned_grid():
    # Thin positions that span the thick ones evenly: torch's trilinear resize (align_corners)
    # is an independent implementation of the same map.
    rng = np.random.default_rng(0)
    thick = rng.normal(size=(4, 3, 5, 6)).astype(np.float32)
    out = condition(thick, np.array([0.0, 5.0, 10.0]), np.linspace(0.0, 10.0, 11))
    reference = F.interpolate(torch.from_numpy(thick)[None], size=(11, 5, 6), mode="trilinear", align_corners=True)
    np.testing.assert_allclose(out, reference[0].numpy(), rtol=0, atol=1e-5)
    with pytest.raises(ValueError):
        condition(thick[0], np.array([0.0, 5.0, 10.0]), np.arange(3.0))


def test_single_thick_slice_conditions_every_thin_slice():
    thick = np.arange(8, dtype=np.float32).reshape(2, 1, 2, 2)
    out = condition(thick, np.array([5.0]), np.array([3.0, 5.0, 7.0]))
    np.testing.assert_array_equal(out, np.repeat(thick, 3, axis=1))
