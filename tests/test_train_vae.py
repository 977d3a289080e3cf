import shutil

import numpy as np
import pytest
import torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi

from ctdiff.autoencoder import PRESETS, CtAutoencoder
from ctdiff.checkpoint import load_vae
from ctdiff.config import load_config
from ctdiff.errors import UsageError
from ctdiff.patches import PatchSampler
from ctdiff.pretrained import WeightsMismatch
from ctdiff.store import CaseStore
from ctdiff.train_vae import train_vae, validate

WINDOW = (40.0, 400.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def store(vae_store):
    return vae_store


def _config(*overrides: str, preset: str = "slice-kl-tiny"):
    return load_config(None, [
        f"vae.preset={preset}", "train_vae.patch_slices=4", "train_vae.patch_size=32",
        "train_vae.batch_size=4", "train_vae.lr=1e-3", *overrides,
    ])


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# -- patches ---------------------------------------------------------------------------------------


def test_patches_are_deterministic_windowed_and_both_kinds(store):
    ids = store.ids(split="train")
    a = PatchSampler(store, ids, WINDOW, 4, 16, np.random.default_rng(7))
    b = PatchSampler(store, ids, WINDOW, 4, 16, np.random.default_rng(7))
    state = a.rng_state()
    first = a.sample(6)
    assert first.shape == (6, 1, 4, 16, 16) and first.dtype == np.float32
    assert 0.0 <= first.min() and first.max() <= 1.0 and first.std() > 0.05
    np.testing.assert_array_equal(first, b.sample(6))
    a.set_rng_state(state)
    np.testing.assert_array_equal(first, a.sample(6))  # replay from a saved state

    # Patch depth 12: thick volumes have 4 slices, so their patches end in zero (padding) slices.
    deep = PatchSampler(store, ids, WINDOW, 12, 32, np.random.default_rng(0)).sample(32)
    padded = np.all(deep[:, 0, 4:] == 0, axis=(1, 2, 3))
    assert 5 < padded.sum() < 27  # about half thick, half thin


def test_residual_patches_read_each_thick_series_once(store, monkeypatch):
    ids = store.ids(split="train")
    uncached = PatchSampler(store, ids, WINDOW, 4, 16, np.random.default_rng(5), base="cubic", thick_cache_bytes=0)
    expected = uncached.sample(12)
    reads = []
    original = CaseStore.read

    def counting(self, case_id, kind, *args, **kwargs):
        reads.append((case_id, kind, kwargs.get("z_slice")))
        return original(self, case_id, kind, *args, **kwargs)

    monkeypatch.setattr(CaseStore, "read", counting)
    cached = PatchSampler(store, ids, WINDOW, 4, 16, np.random.default_rng(5), base="cubic")
    np.testing.assert_array_equal(cached.sample(12), expected)  # the cache changes no value
    whole_thick = [r for r in reads if r[1] == "thick" and r[2] is None]
    assert len(whole_thick) == len({r[0] for r in whole_thick}) <= len(ids)
    assert sum(r[1] == "thin" for r in reads) == 12  # one thin slab per patch, no thick patches


def test_patch_is_the_windowed_volume_when_it_covers_it(store):
    ids = store.ids(split="train")
    sampler = PatchSampler(store, ids, WINDOW, 24, 40, np.random.default_rng(3), thick_probability=0.0)
    patch = sampler.sample(1)[0, 0]  # (24, 40, 40): larger than the (20, 32, 32) thin volumes
    assert np.all(patch[20:] == 0) and np.all(patch[:, 32:] == 0) and np.all(patch[:, :, 32:] == 0)
    volumes = [store.read(case_id, "thin").window(*WINDOW) for case_id in ids]
    assert any(np.array_equal(patch[:20, :32, :32], v) for v in volumes)


# -- training --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def overfit(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("overfit") / "checkpoints" / "vae"
    # The whole-image formulation: its val PSNR measures learning from scratch (a residual VAE's
    # ceiling starts at cubic's; tests/test_residual_model.py covers that one).
    config = _config("train_vae.steps=200", "train_vae.val_every=10", "train_vae.checkpoint_every=100",
                     "diffusion.base=none")
    reports = []
    result = train_vae(store, out, config, progress=reports.append)
    return result, out, config, reports


def test_tiny_vae_overfits_and_val_psnr_improves(store, overfit):
    result, out, _, reports = overfit
    history = _load(out / "last.pt")["history"]
    psnrs = [row["val_psnr"] for row in history if row["val_psnr"] is not None]
    assert len(history) == 200 and len(psnrs) == 20
    print("val PSNR by validation:", [round(p, 2) for p in psnrs])
    assert result["best_val_psnr"] == pytest.approx(max(psnrs))
    # Observed (torch 2.13 CPU): 11.96 dB at step 10, best 15.23 at step 110, 14.63 at step 200.
    assert max(psnrs) > psnrs[0] + 2.5, psnrs
    # It overfits its two training cases: observed ~20.5 dB on them at step 200.
    model, _ = load_vae(out / "last.pt")
    train_psnr = validate(model, store, store.ids(split="train"), WINDOW, 64, torch.device("cpu"))["val_psnr"]
    assert train_psnr > 18.0 and train_psnr > psnrs[-1] + 3.0
    assert np.mean([r["l1"] for r in history[-20:]]) < 0.5 * np.mean([r["l1"] for r in history[:20]])
    assert result["step"] == 200 and result["resumed_from"] is None and result["pretrained"] is None
    assert reports[-1]["step"] == 200 and reports[-1]["eta_s"] == 0.0
    assert {"step", "steps", "loss", "val_psnr", "seconds_per_step", "eta_s"} <= set(reports[0])
    assert len(reports) >= 20  # at least one per validation


def test_checkpoints_are_plain_and_best_is_the_best_step(store, overfit):
    result, out, config, _ = overfit
    last, best = _load(result["last"]), _load(result["best"])
    for payload in (last, best):
        assert payload["kind"] == "vae" and payload["preset"] == "slice-kl-tiny"
        assert payload["config"] == config.model_dump(mode="json")
        assert set(payload["rng"]) == {"torch", "numpy", "cuda"}
        assert payload["data"] == {"train_ids": store.ids(split="train"), "val_ids": store.ids(split="val"),
                                   "validate_on": "val", "inplane_px": [32, 32]}
    history = last["history"]
    best_row = max((r for r in history if r["val_psnr"] is not None), key=lambda r: r["val_psnr"])
    assert best["step"] == best_row["step"] and best["best_val_psnr"] == best_row["val_psnr"]
    assert last["step"] == 200 and last["best_val_psnr"] == best_row["val_psnr"]
    model, _ = load_vae(result["best"])
    assert model.preset_name == "slice-kl-tiny"
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_finished_training_is_not_redone(store, overfit):
    result, out, config, _ = overfit
    mtime = (out / "last.pt").stat().st_mtime_ns
    again = train_vae(store, out, config)
    assert again["step"] == 200 and again["best_val_psnr"] == result["best_val_psnr"]
    assert (out / "last.pt").stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="paths.work"):
        train_vae(store, out, _config("train_vae.steps=200", preset="maisi-tiny"))


def test_an_empty_val_split_is_an_error_unless_validating_on_train_is_asked_for(store, tmp_path):
    train_only = CaseStore(shutil.copytree(store.path, tmp_path / "train-only.zarr"))
    train_only.set_splits({case_id: "train" for case_id in train_only.ids()})
    config = _config("train_vae.steps=2", "train_vae.val_every=1", "diffusion.base=none")
    with pytest.raises(UsageError, match=r"^no val cases in .*train-only\.zarr: set preprocess\.split .*"
                                         r"or set train_vae\.validate_on=train to validate on training cases$"):
        train_vae(train_only, tmp_path / "vae", config)
    assert not (tmp_path / "vae").exists()  # refused before training

    config.train_vae.validate_on = "train"
    result = train_vae(train_only, tmp_path / "vae", config)
    assert result["step"] == 2 and result["best_val_psnr"] is not None
    ids = train_only.ids()
    for name in ("last", "best"):
        assert _load(result[name])["data"] == {"train_ids": ids, "val_ids": ids, "validate_on": "train",
                                               "inplane_px": [32, 32]}


class _Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing in the trainer may catch it."""


@pytest.mark.parametrize("preset", ["slice-kl-tiny", "maisi-tiny"])
def test_killed_run_resumes_to_identical_weights(store, tmp_path, preset):
    # With the PatchGAN on from step 4, the discriminator's state must be resumed exactly too.
    config = _config(
        "train_vae.steps=12", "train_vae.checkpoint_every=6", "train_vae.val_every=4",
        "train_vae.adversarial_weight=0.1", "train_vae.adversarial_start=4", preset=preset,
    )
    a = train_vae(store, tmp_path / "a", config)

    def kill_after_first_checkpoint(report):
        if (tmp_path / "b" / "last.pt").is_file():
            raise _Killed

    with pytest.raises(_Killed):
        train_vae(store, tmp_path / "b", config, progress=kill_after_first_checkpoint)
    assert _load(tmp_path / "b" / "last.pt")["step"] == 6
    b = train_vae(store, tmp_path / "b", config)
    assert b["resumed_from"] == 6 and a["resumed_from"] is None and b["step"] == 12

    last_a, last_b = _load(a["last"]), _load(b["last"])
    for part in ("model", "discriminator"):
        assert last_a[part].keys() == last_b[part].keys()
        for key, tensor in last_a[part].items():
            assert torch.equal(tensor, last_b[part][key]), f"{part}.{key}"
    assert last_a["history"] == last_b["history"]  # losses and val metrics, step by step
    assert last_a["history"][-1]["adv"] is not None and last_a["history"][0]["adv"] is None
    assert _load(a["best"])["step"] == _load(b["best"])["step"]


# -- pretrained weights ----------------------------------------------------------------------------


def test_zero_steps_adopts_pretrained_weights_exactly(store, tmp_path):
    torch.manual_seed(123)  # not the trainer's seed: the adopted tensors must win over its init
    state = CtAutoencoder("maisi-tiny").net.state_dict()
    weights = tmp_path / "autoencoder.pt"
    torch.save({"state_dict": state}, weights)
    config = _config("train_vae.steps=0", f"vae.pretrained={weights}", preset="maisi-tiny")
    result = train_vae(store, tmp_path / "vae", config)
    assert result["step"] == 0 and result["pretrained"].startswith(f"{len(state)} loaded, 0 missing")
    assert result["best_val_psnr"] is not None
    for name in ("last", "best"):
        saved = _load(result[name])["model"]
        assert saved.keys() == state.keys()
        for key, tensor in state.items():
            assert torch.equal(saved[key], tensor), key


def test_pretrained_with_other_latent_channels_is_refused(store, tmp_path):
    preset = PRESETS["maisi-tiny"]
    other = AutoencoderKlMaisi(
        spatial_dims=3, in_channels=1, out_channels=1, latent_channels=3,
        num_channels=list(preset.channels), num_res_blocks=list(preset.num_res_blocks),
        norm_num_groups=preset.norm_num_groups, attention_levels=[False] * 3,
        with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False, norm_float16=False,
    )
    weights = tmp_path / "latent3.pt"
    torch.save(other.state_dict(), weights)
    config = _config("train_vae.steps=0", f"vae.pretrained={weights}", preset="maisi-tiny")
    with pytest.raises(WeightsMismatch, match=r"encoder\.blocks\.7\.conv\.conv\.weight"):
        train_vae(store, tmp_path / "vae", config)
    assert not (tmp_path / "vae" / "last.pt").exists()
