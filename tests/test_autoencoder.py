import pytest
import torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi

from ctdiff.autoencoder import PRESETS, CtAutoencoder, kl_loss
from ctdiff.checkpoint import checkpoint_digest, load_checkpoint, load_vae, save_checkpoint, vae_preset
from ctdiff.pretrained import WeightsMismatch, load_pretrained


def test_maisi_ct_matches_nvidia_released_network():
    net = CtAutoencoder("maisi-ct").net
    assert isinstance(net, AutoencoderKlMaisi)
    assert len(net.state_dict()) == 130
    assert sum(p.numel() for p in net.parameters()) == 20_944_897


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_compress_as_documented(name):
    model = CtAutoencoder(name).eval()
    dz, dy, dx = model.factors
    x = torch.rand(1, 1, 8, 32, 32)
    with torch.no_grad():
        mu, sigma = model.encode(x)
        recon = model.decode(mu)
    assert mu.shape == (1, 4, x.shape[2] // dz, 32 // dy, 32 // dx)
    assert sigma.shape == mu.shape and bool((sigma > 0).all())
    assert recon.shape == x.shape
    in_plane = 4 if "-4x" in name else 2 if "-2x" in name else 8
    expected = {"maisi": (4, 4, 4), "slice": (1, in_plane, in_plane)}[PRESETS[name].kind]
    assert model.factors == expected


def test_slice_preset_treats_slices_independently():
    model = CtAutoencoder("slice-kl-tiny").eval()
    x = torch.rand(1, 1, 6, 32, 32)
    with torch.no_grad():
        whole, _ = model.encode(x)
        parts = torch.cat([model.encode(x[:, :, :3])[0], model.encode(x[:, :, 3:])[0]], dim=2)
    torch.testing.assert_close(whole, parts)


def test_kl_is_zero_for_the_prior_and_positive_otherwise():
    mu, sigma = torch.zeros(2, 4, 3), torch.ones(2, 4, 3)
    assert kl_loss(mu, sigma).item() == pytest.approx(0.0, abs=1e-6)
    # closed form for one element: 0.5 * (mu^2 + s^2 - log s^2 - 1)
    assert kl_loss(torch.full((1, 1), 2.0), torch.full((1, 1), 0.5)).item() == pytest.approx(
        0.5 * (4 + 0.25 - torch.log(torch.tensor(0.25)).item() - 1)
    )


def _maisi_tiny_file(tmp_path, wrap=None, prefix=""):
    state = CtAutoencoder("maisi-tiny").net.state_dict()
    state = {prefix + k: v.clone() for k, v in state.items()}
    payload = {wrap: state} if wrap else state
    path = tmp_path / "autoencoder.pt"
    torch.save(payload, path)
    return path, state


@pytest.mark.parametrize("wrap, prefix", [(None, ""), ("state_dict", ""), ("unet_state_dict", ""), (None, "module.")])
def test_pretrained_loads_exactly_from_plain_wrapped_or_prefixed_files(tmp_path, wrap, prefix):
    path, state = _maisi_tiny_file(tmp_path, wrap, prefix)
    target = CtAutoencoder("maisi-tiny").net
    report = load_pretrained(target, path)
    assert report.complete and len(report.loaded) == len(state) == 78
    for key, tensor in target.state_dict().items():
        assert torch.equal(tensor, state[prefix + key])


def test_nvidia_sized_maisi_checkpoint_round_trips_130_of_130(tmp_path):
    source = CtAutoencoder("maisi-ct").net.state_dict()
    path = tmp_path / "autoencoder.pt"
    torch.save(source, path)
    target = CtAutoencoder("maisi-ct").net
    report = load_pretrained(target, path)
    assert len(report.loaded) == 130 and report.complete
    assert all(torch.equal(target.state_dict()[k], v) for k, v in source.items())


def test_a_latent_3_checkpoint_is_refused_with_the_keys_named(tmp_path):
    # One seed project hand-built a MAISI VAE with 3 latent channels: it must not load silently.
    other = AutoencoderKlMaisi(
        spatial_dims=3, in_channels=1, out_channels=1, latent_channels=3, num_channels=[8, 16, 16],
        num_res_blocks=[1, 1, 1], norm_num_groups=4, attention_levels=[False] * 3,
        with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False, norm_float16=False,
    )
    path = tmp_path / "latent3.pt"
    torch.save(other.state_dict(), path)
    with pytest.raises(WeightsMismatch) as info:
        load_pretrained(CtAutoencoder("maisi-tiny").net, path)
    message = str(info.value)
    assert "9 shape-mismatched" in message and "allow_partial" in message
    assert "(16, 3, 3, 3, 3) vs network (16, 4, 3, 3, 3)" in message  # names the key and both shapes
    report = load_pretrained(CtAutoencoder("maisi-tiny").net, path, allow_partial=True)
    assert report.mismatched and report.loaded


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsMismatch, match="not a loadable torch checkpoint"):
        load_pretrained(CtAutoencoder("maisi-tiny").net, path)
    with pytest.raises(WeightsMismatch, match="no such weights file"):
        load_pretrained(CtAutoencoder("maisi-tiny").net, tmp_path / "absent.pt")


def test_checkpoint_round_trip_and_digest(tmp_path):
    model = CtAutoencoder("slice-kl-tiny")
    path = save_checkpoint(tmp_path / "vae" / "last.pt", {"kind": "vae", "preset": "slice-kl-tiny",
                                                          "model": model.net.state_dict(), "step": 3})
    assert not list((tmp_path / "vae").glob(".*tmp"))
    assert load_checkpoint(path)["step"] == 3
    loaded, payload = load_vae(path)
    assert vae_preset(path) == "slice-kl-tiny"
    assert all(torch.equal(loaded.net.state_dict()[k], v) for k, v in model.net.state_dict().items())
    digest = checkpoint_digest(path)
    save_checkpoint(tmp_path / "copy.pt", {**payload, "step": 99})
    assert checkpoint_digest(tmp_path / "copy.pt") == digest  # weights, not bookkeeping
    with torch.no_grad():
        next(model.net.parameters()).add_(1.0)
    save_checkpoint(tmp_path / "changed.pt", {**payload, "model": model.net.state_dict()})
    assert checkpoint_digest(tmp_path / "changed.pt") != digest
    save_checkpoint(tmp_path / "diffusion.pt", {**payload, "kind": "diffusion"})
    for read in (load_vae, vae_preset):
        with pytest.raises(ValueError, match="not a ctdiff VAE checkpoint"):
            read(tmp_path / "diffusion.pt")
