"""`train-vae` and `encode-latents` end to end on a tiny synthetic store."""

import numpy as np
import pytest
import torch

from ctdiff.autoencoder import CtAutoencoder
from ctdiff.cases import discover_cases
from ctdiff.checkpoint import checkpoint_digest, load_checkpoint, load_vae
from ctdiff.interpolate import interpolate_z
from ctdiff.latents import LatentStore, encode_volume
from ctdiff.preprocess import decode_case, resize_case
from ctdiff.residual import RESIDUAL_GAIN
from ctdiff.store import CaseStore
from ctdiff.synth import SynthSpec, synthesize
from flows.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae")
    synthesize(root / "cases", SynthSpec(n_cases=3, size=32, n_thin=20, seed=5))
    store = CaseStore(root / "store.zarr")
    store.create()
    refs = discover_cases(root / "cases")
    for ref in refs:
        decode_case(ref, store)
        resize_case(ref, store, None)
    store.set_splits({refs[0].id: "train", refs[1].id: "train", refs[2].id: "val"})
    return root / "store.zarr"


def _overrides(store_path, work):
    return [
        f"paths.store={store_path}", f"paths.work={work}", "vae.preset=slice-kl-tiny",
        "train_vae.steps=6", "train_vae.patch_slices=4", "train_vae.patch_size=32", "train_vae.batch_size=2",
        "train_vae.val_every=3", "train_vae.checkpoint_every=3", "train_vae.val_cases=1", "train_vae.device=cpu",
        "encode.chunk_slices=8", "encode.device=cpu",
    ]


def test_train_then_encode(store_path, tmp_path, prefect_harness):
    from flows.encode_latents import encode_latents
    from flows.train_vae import train_vae

    overrides = _overrides(store_path, tmp_path / "work")
    trained = train_vae(config=None, overrides=overrides)
    assert trained["step"] == 6
    last = tmp_path / "work" / "checkpoints" / "vae" / "last.pt"
    assert load_checkpoint(last)["step"] == 6

    encoded = encode_latents(config=None, overrides=overrides)
    assert encoded["cases"] == 3
    digest = checkpoint_digest(tmp_path / "work" / "checkpoints" / "vae" / "best.pt")
    latents = LatentStore(tmp_path / "work" / "latents", digest)
    assert sorted(latents.ids()) == sorted(CaseStore(store_path).ids())
    assert latents.scale_factor == pytest.approx(encoded["scale_factor"]) and latents.scale_factor > 0

    # The cache holds the posterior mean of the windowed thin volume's gained residual over cubic
    # (the default formulation), as an independent call gives it, and the base as the condition.
    model, payload = load_vae(tmp_path / "work" / "checkpoints" / "vae" / "best.pt")
    assert payload["target"]["base"] == "cubic" and latents.base == "cubic"
    case_id = CaseStore(store_path).ids()[0]
    thin_volume, thick = CaseStore(store_path).read(case_id, "thin"), CaseStore(store_path).read(case_id, "thick")
    thin = thin_volume.window(40, 400)
    base = np.clip(interpolate_z(thick.window(40, 400), thick.z_mm, thin_volume.z_mm, "cubic"), 0, 1)
    residual = RESIDUAL_GAIN * (thin - base)
    with torch.no_grad():
        mean, _ = model.encode(torch.from_numpy(residual.astype(np.float32))[None, None])
    np.testing.assert_allclose(latents.read(case_id, "thin"), mean[0].numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(encode_volume(model, residual, 8, "cpu"), mean[0].numpy(), rtol=1e-4, atol=1e-4)
    assert latents.read(case_id, "condition").shape[0] == 64  # 8 x 8 base pixels per latent voxel

    # A re-run encodes nothing: every case is served from the cache and no file is rewritten.
    before = {p: p.stat().st_mtime_ns for p in (latents.path / "cases").rglob("zarr.json")}
    assert len(before) >= 3 * 3  # a group and two arrays per case
    assert encode_latents(config=None, overrides=overrides)["cases"] == 3
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_cli_refuses_mismatched_pretrained_weights(store_path, tmp_path, capsys):
    wrong = tmp_path / "autoencoder.pt"
    torch.save(CtAutoencoder("slice-kl-tiny").net.state_dict(), wrong)
    argv = ["train-vae", "--set", f"paths.store={store_path}", "--set", "vae.preset=maisi-tiny",
            "--set", f"vae.pretrained={wrong}", "--set", "train_vae.steps=0"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ctdiff: error: vae.pretrained:") and "\n" not in err


def _sets(overrides: list[str]) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


def test_encode_refuses_another_window_and_an_empty_train_split(store_path, tmp_path, prefect_harness, capsys):
    import shutil

    overrides = _overrides(store_path, tmp_path / "work") + ["train_vae.steps=0"]
    assert main(["train-vae", *_sets(overrides)]) == 0

    # The VAE was trained in 40/400 HU: latents in another window would not be what it learned.
    assert main(["encode-latents", *_sets(overrides + ["preprocess.window.center_hu=100"])]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "was trained in window 40/400 HU" in last and "preprocess.window is 100/400 HU" in last

    # The scale factor is a statistic of the train split, never of val or test cases.
    no_train = tmp_path / "no-train.zarr"
    shutil.copytree(store_path, no_train)
    CaseStore(no_train).set_splits({case_id: "val" for case_id in CaseStore(no_train).ids()})
    assert main(["encode-latents", *_sets(_overrides(no_train, tmp_path / "work"))]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("ctdiff: encode-latents: error: no train cases") and "preprocess.split" in last
