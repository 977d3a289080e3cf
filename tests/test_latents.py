import os

import numpy as np
import pytest
import torch
from torch import nn

from ctdiff import latents as latents_module
from ctdiff.autoencoder import CtAutoencoder
from ctdiff.latents import (
    LatentStore,
    compute_scale_factor,
    decode_latents,
    encode_case,
    encode_volume,
    latent_key,
    padding_for,
)
from ctdiff.phantom import chest_phantom
from ctdiff.store import CaseStore
from ctdiff.volume import Volume
from ctdiff.windowing import apply_window

WINDOW = (40.0, 400.0)


def _model(preset: str, seed: int = 0) -> CtAutoencoder:
    torch.manual_seed(seed)
    return CtAutoencoder(preset).eval()


def _phantom(depth: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """Windowed chest phantom (D, H, W) in [0, 1]: CT-like structure along depth."""
    hu = chest_phantom(depth, size, 350.0 / size, 1.0, np.random.default_rng(seed))
    return apply_window(hu, *WINDOW)


def _drop_norms(model: nn.Module) -> nn.Module:
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if "Norm" in type(child).__name__:
                setattr(module, name, nn.Identity())
    return model


# -- encode_volume / decode_latents ------------------------------------------------------------


@pytest.mark.parametrize("preset", ["slice-kl-tiny", "maisi-tiny"])
def test_encode_volume_is_the_deterministic_posterior_mean(preset):
    model = _model(preset)
    x = _phantom(16)
    model.train()  # encode_volume must switch to eval and back
    z = encode_volume(model, x, chunk_slices=64, device="cpu")
    assert model.training
    model.eval()
    with torch.no_grad():
        mu, sigma = model.encode(torch.from_numpy(x)[None, None])
    assert z.dtype == np.float32 and z.shape == tuple(mu.shape[1:])
    np.testing.assert_array_equal(z, mu[0].numpy())
    assert float(sigma.min()) > 0  # a sample would differ from the mean
    np.testing.assert_array_equal(encode_volume(model, x, 64, "cpu"), z)


def test_slice_preset_chunks_match_the_whole_volume():
    model = _model("slice-kl-tiny")
    x = _phantom(13)
    whole = encode_volume(model, x, chunk_slices=100, device="cpu")
    assert whole.shape == (4, 13, 4, 4)
    for chunk in (1, 5):
        # The same maths per slice; only the conv kernels' batch size differs (float rounding).
        np.testing.assert_allclose(encode_volume(model, x, chunk, "cpu"), whole, rtol=0, atol=1e-5)
    image = decode_latents(model, whole, x.shape, chunk_slices=100, device="cpu")
    np.testing.assert_allclose(decode_latents(model, whole, x.shape, 3, "cpu"), image, rtol=0, atol=1e-5)


def test_maisi_halo_bookkeeping_is_exact_when_it_covers_the_receptive_field():
    # Without GroupNorm (whose statistics are per chunk), a halo of 24 image slices covers
    # maisi-tiny's receptive field, so chunks must reassemble the whole-volume latents exactly;
    # an off-by-one in the halo crop would show as errors of the order of the latent std.
    model = _drop_norms(_model("maisi-tiny"))
    x = _phantom(48)
    whole = encode_volume(model, x, chunk_slices=100, device="cpu")
    chunked = encode_volume(model, x, chunk_slices=8, device="cpu", halo_slices=24)
    assert np.abs(chunked - whole).max() < 1e-5 * whole.std()
    image = decode_latents(model, whole, x.shape, chunk_slices=100, device="cpu")
    image_chunked = decode_latents(model, whole, x.shape, chunk_slices=8, device="cpu", halo_slices=24)
    assert np.abs(image_chunked - image).max() < 1e-5 * image.std()


def test_maisi_chunked_encoding_error_is_small():
    model = _model("maisi-tiny")
    x = _phantom(48)
    whole = encode_volume(model, x, chunk_slices=100, device="cpu")
    error = np.abs(encode_volume(model, x, chunk_slices=16, device="cpu") - whole) / whole.std()
    no_halo = np.abs(encode_volume(model, x, 16, "cpu", halo_slices=0) - whole) / whole.std()
    # Measured on the synthetic phantom: mean 0.024, max 0.30 (random weights; GroupNorm over
    # chunks and a receptive field wider than the halo). Without a halo: mean 0.40, max 4.4.
    assert error.mean() < 0.03 and error.max() < 0.4
    assert error.mean() < no_halo.mean() / 10
    with pytest.raises(ValueError, match="multiple of 4"):
        encode_volume(model, x, 16, "cpu", halo_slices=6)


@pytest.mark.parametrize(
    "preset, shape, latent_shape",
    [("maisi-tiny", (13, 30, 34), (4, 4, 8, 9)), ("slice-kl-tiny", (12, 30, 34), (4, 12, 4, 5))],
)
def test_padding_is_recorded_and_cropped_on_decode(preset, shape, latent_shape):
    model = _model(preset)
    x = np.random.default_rng(1).random(shape, dtype=np.float32)
    z = encode_volume(model, x, chunk_slices=8, device="cpu")
    assert z.shape == latent_shape
    assert padding_for(shape, model.factors) == tuple(
        n * f - s for n, f, s in zip(latent_shape[1:], model.factors, shape)
    )
    image = decode_latents(model, z, shape, chunk_slices=8, device="cpu")
    assert image.shape == shape and image.dtype == np.float32
    with pytest.raises(ValueError, match="do not fit"):
        decode_latents(model, z, (shape[0] + 16, *shape[1:]), 8, "cpu")


# -- LatentStore ---------------------------------------------------------------------------------


def _latent_store(tmp_path, digest="vae0") -> LatentStore:
    store = LatentStore(tmp_path / "latents", digest)
    store.create("slice-kl-tiny", (1, 8, 8), WINDOW)
    return store


def _random_latents(seed, depth=10):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(0.5, 2.0, size=(4, depth // 5, 4, 4)).astype(np.float32),
        rng.normal(0.5, 2.0, size=(4, depth, 4, 4)).astype(np.float32),
    )


def test_latent_store_round_trip(tmp_path):
    store = _latent_store(tmp_path)
    assert store.path == tmp_path / "latents" / "vae0"
    thick, thin = _random_latents(0, depth=20)
    attrs = {"key": "k1", "window": list(WINDOW), "thick": {"shape": [4, 32, 32], "padding": [0, 0, 0]},
             "thin": {"shape": [20, 32, 32], "z_mm": [0.5, 1.5]}}
    store.write_case("c1", {"thick": thick, "thin": thin}, attrs)
    np.testing.assert_array_equal(store.read("c1", "thick"), thick)
    np.testing.assert_array_equal(store.read("c1", "thin"), thin)
    np.testing.assert_array_equal(store.read("c1", "thin", slice(3, 11)), thin[:, 3:11])
    assert store.case_attrs("c1") == attrs and store.case_key("c1") == "k1"
    assert store.ids() == ["c1"] and store.case_key("missing") is None
    assert store.manifest() == [
        {"id": "c1", "key": "k1", "thick_shape": [4, 32, 32], "thick_latent_shape": [4, 4, 4, 4],
         "thin_shape": [20, 32, 32], "thin_latent_shape": [4, 20, 4, 4], "condition_shape": None}
    ]
    root = store.root_attrs()
    assert root["vae_digest"] == "vae0" and root["preset"] == "slice-kl-tiny"
    assert root["factors"] == [1, 8, 8] and root["window"] == list(WINDOW)
    with pytest.raises(KeyError):
        store.read("missing", "thin")


def test_killed_write_leaves_no_case_visible(tmp_path, monkeypatch):
    store = _latent_store(tmp_path)
    thick, thin = _random_latents(0)
    store.write_case("c1", {"thick": thick, "thin": thin}, {"key": "old"})

    def killed(source, target):
        raise KeyboardInterrupt  # the worker dies before the rename

    monkeypatch.setattr(latents_module, "replace_dir", killed)
    with pytest.raises(KeyboardInterrupt):
        store.write_case("c2", {"thick": thick, "thin": thin}, {"key": "new"})
    with pytest.raises(KeyboardInterrupt):
        store.write_case("c1", {"thick": thick + 1, "thin": thin + 1}, {"key": "new"})
    assert store.ids() == ["c1"] and store.case_key("c2") is None
    assert store.case_key("c1") == "old"
    np.testing.assert_array_equal(store.read("c1", "thin"), thin)
    assert any((store.path / ".staging").iterdir())
    store.create("slice-kl-tiny", (1, 8, 8), WINDOW)  # a new run clears the staging leftovers
    assert not (store.path / ".staging").exists()


def test_scale_factor_is_one_over_the_thin_latent_std(tmp_path):
    store = _latent_store(tmp_path)
    thins = []
    for i, case_id in enumerate(["a", "b", "c"]):
        thick, thin = _random_latents(i, depth=5 * (i + 1))
        store.write_case(case_id, {"thick": thick, "thin": thin}, {"key": case_id})
        thins.append(thin)
    assert store.scale_factor is None
    value = compute_scale_factor(store, ["a", "c"])
    expected = 1.0 / np.concatenate([thins[0].ravel(), thins[2].ravel()]).astype(np.float64).std()
    assert value == pytest.approx(expected, rel=1e-12)
    assert value == pytest.approx(0.5, rel=0.1)  # drawn with std 2
    store.set_scale_factor(value)
    assert LatentStore(tmp_path / "latents", "vae0").scale_factor == value
    store.create("slice-kl-tiny", (1, 8, 8), WINDOW)  # same window: kept
    assert store.scale_factor == value
    store.create("slice-kl-tiny", (1, 8, 8), (-600.0, 1500.0))  # new window: latents change
    assert store.scale_factor is None
    with pytest.raises(ValueError):
        store.set_scale_factor(float("nan"))
    with pytest.raises(ValueError, match="encode the train split"):
        compute_scale_factor(store, [])


# -- encode_case ---------------------------------------------------------------------------------


def _case_store(tmp_path, n_cases=2) -> CaseStore:
    """A tiny case store written directly: thick = 5-slice means of a 20-slice thin phantom."""
    store = CaseStore(tmp_path / "store.zarr")
    store.create()
    for i in range(n_cases):
        hu = chest_phantom(20, 32, 350.0 / 32, 1.0, np.random.default_rng(i))
        z_thin = -100.0 + np.arange(20.0)
        thin = Volume(np.rint(hu).astype(np.int16), (1.0, 10.9, 10.9), z_thin)
        thick_hu = np.rint(hu.reshape(4, 5, 32, 32).mean(axis=1)).astype(np.int16)
        thick = Volume(thick_hu, (5.0, 10.9, 10.9), z_thin.reshape(4, 5).mean(axis=1))
        case_id = f"case_{i:03d}"
        store.write_native(case_id, {"thick": thick, "thin": thin}, f"n{i}", {}, 8, 1)
        entry = {"id": case_id, "status": "ok", "reason": None, "category": "APE", "n_thick": 4, "n_thin": 20}
        store.write_case(case_id, {}, f"c{i}", entry, 8, 1)
    return store


def _snapshot(path):
    return {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in sorted(path.rglob("*"))}


def test_create_with_the_same_settings_writes_nothing(tmp_path):
    """A fully cached encode-latents rerun (prepare_latent_store) leaves the root zarr.json as it was."""
    store = LatentStore(tmp_path / "latents", "vae0")
    store.create("slice-kl-tiny", (1, 8, 8), WINDOW, "cubic")
    store.set_scale_factor(0.5, key="k")
    root_json = store.path / "zarr.json"
    os.utime(root_json, ns=(1_000_000_000, 1_000_000_000))  # a clock tick could hide a rewrite
    before = root_json.read_bytes()
    (store.path / ".staging").mkdir()
    store.create("slice-kl-tiny", [1, 8, 8], [40, 400], "cubic")  # equal values, other types
    assert root_json.stat().st_mtime_ns == 1_000_000_000 and root_json.read_bytes() == before
    assert not (store.path / ".staging").exists()  # staging is still cleared
    store.create("slice-kl-tiny", (1, 8, 8), WINDOW, "none")  # another base: rewritten, factor reset
    assert root_json.stat().st_mtime_ns != 1_000_000_000
    assert store.base == "none" and store.scale_factor is None


@pytest.mark.parametrize("preset", ["slice-kl-tiny", "maisi-tiny"])
def test_encode_case_writes_means_and_is_idempotent(tmp_path, preset):
    case_store = _case_store(tmp_path)
    model = _model(preset)
    store = LatentStore(tmp_path / "work" / "latents", "digest")
    key = latent_key(case_store.case_key("case_000"), "digest", WINDOW, 8)
    summary = encode_case(case_store, "case_000", model, store, WINDOW, 8, "cpu", key)
    assert summary["cached"] is False and summary["thin_shape"] == [20, 32, 32]
    thin_expected = encode_volume(model, case_store.read("case_000", "thin").window(*WINDOW), 8, "cpu")
    assert summary["thin_latent_shape"] == list(thin_expected.shape)
    np.testing.assert_array_equal(store.read("case_000", "thin"), thin_expected)
    attrs = store.case_attrs("case_000")
    assert attrs["key"] == key and attrs["window"] == list(WINDOW)
    assert attrs["thick"]["shape"] == [4, 32, 32] and attrs["thick"]["spacing_mm"] == [5.0, 10.9, 10.9]
    assert attrs["thin"]["z_mm"] == list(-100.0 + np.arange(20.0))
    factors = model.factors
    assert attrs["thin"]["padding"] == [-n % f for n, f in zip((20, 32, 32), factors)]
    assert store.root_attrs()["preset"] == preset and store.root_attrs()["factors"] == list(factors)
    assert store.manifest()[0]["thick_latent_shape"] == list(store.read("case_000", "thick").shape)

    before = _snapshot(store.path)
    again = encode_case(case_store, "case_000", model, store, WINDOW, 8, "cpu", key)
    assert again["cached"] is True and _snapshot(store.path) == before
    assert {k: v for k, v in again.items() if k not in ("cached", "seconds")} == store.entry("case_000")

    new_key = latent_key(case_store.case_key("case_000"), "other-digest", WINDOW, 8)
    assert new_key != key
    assert encode_case(case_store, "case_000", model, store, WINDOW, 8, "cpu", new_key)["cached"] is False
    assert store.case_key("case_000") == new_key


def test_latent_key_follows_its_inputs_and_window_mismatch_is_refused(tmp_path):
    base = latent_key("c0", "vae", WINDOW, 64)
    assert base == latent_key("c0", "vae", [40, 400], 64)
    others = {latent_key("c1", "vae", WINDOW, 64), latent_key("c0", "vae2", WINDOW, 64),
              latent_key("c0", "vae", (50.0, 400.0), 64), latent_key("c0", "vae", WINDOW, 32)}
    assert base not in others and len(others) == 4
    case_store = _case_store(tmp_path, n_cases=1)
    store = _latent_store(tmp_path)
    with pytest.raises(ValueError, match="create"):
        encode_case(case_store, "case_000", _model("slice-kl-tiny"), store, (0.0, 100.0), 8, "cpu", "k")


def test_the_vae_encodes_and_decodes_in_fp32_under_any_callers_autocast():
    """One precision rule: the latent cache (no autocast) and inference (bf16 autocast on CUDA;
    on the CPU here) get bit-identical latents and images."""
    torch.manual_seed(0)
    model = CtAutoencoder("slice-kl-tiny").eval()
    x = np.random.default_rng(0).random((4, 16, 16), dtype=np.float32)
    z = encode_volume(model, x, chunk_slices=4)
    image = decode_latents(model, z, x.shape, chunk_slices=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert np.array_equal(encode_volume(model, x, chunk_slices=4), z)
        assert np.array_equal(decode_latents(model, z, x.shape, chunk_slices=4), image)
        with torch.no_grad():  # the same model called directly under autocast does differ
            direct, _ = model.encode(torch.from_numpy(x)[None, None])
    assert not torch.equal(direct.float(), torch.from_numpy(z)[None])
