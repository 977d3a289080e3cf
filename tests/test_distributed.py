"""Training on two DDP processes under torchrun (gloo, CPU), launched as the training tasks do."""

import shutil

import pytest
import torch

from ctdiff.autoencoder import CtAutoencoder
from ctdiff.checkpoint import checkpoint_digest, save_checkpoint
from ctdiff.config import load_config
from ctdiff.distributed import launch_training, train, training_processes
from ctdiff.latents import LatentStore, compute_scale_factor, encode_case
from ctdiff.store import CaseStore

WINDOW = (40.0, 400.0)


def _vae_config(steps: int):
    return load_config(None, [
        "vae.preset=slice-kl-tiny", "train_vae.patch_slices=4", "train_vae.patch_size=32", "train_vae.batch_size=2",
        "train_vae.lr=1e-3", f"train_vae.steps={steps}", "train_vae.val_every=3", "train_vae.checkpoint_every=3",
        "train_vae.val_cases=1", "train_vae.device=cpu", "train_vae.processes=2",
    ])


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_processes_default_to_one_per_gpu_and_one_on_the_cpu():
    assert training_processes(_vae_config(1).train_vae) == 2
    assert training_processes(load_config(None, ["train_vae.device=cpu"]).train_vae) == 1
    assert training_processes(load_config(None, ["train_diffusion.device=cpu"]).train_diffusion) == 1


def test_vae_on_two_ranks_trains_checkpoints_and_resumes(vae_store, tmp_path):
    out = tmp_path / "vae"
    reports = []
    summary = launch_training("vae", _vae_config(3), out, 2, {"store": str(vae_store.path)}, reports.append)
    assert summary["step"] == 3 and summary["resumed_from"] is None
    assert reports[-1]["step"] == 3  # rank 0's progress reached the caller
    last = _load(out / "last.pt")
    assert last["step"] == 3 and last["config"]["train_vae"]["processes"] == 2
    assert not any(key.startswith("module.") for key in last["model"])  # saved unwrapped, loadable alone
    assert summary["best_val_psnr"] is not None and (out / "best.pt").is_file()

    resumed = launch_training("vae", _vae_config(6), out, 2, {"store": str(vae_store.path)})
    assert resumed["step"] == 6 and resumed["resumed_from"] == 3


def test_diffusion_on_two_ranks_trains_checkpoints_and_resumes(vae_store, tmp_path):
    torch.manual_seed(0)
    vae = CtAutoencoder("slice-kl-tiny").eval()  # untrained: the launch, not the fit, is under test
    vae_path = save_checkpoint(tmp_path / "vae.pt", {"kind": "vae", "preset": vae.preset_name,
                                                     "model": vae.net.state_dict()})
    digest = checkpoint_digest(vae_path)
    latents = LatentStore(tmp_path / "latents", digest)
    latents.create(vae.preset_name, vae.factors, WINDOW)
    for case_id in vae_store.ids():
        encode_case(vae_store, case_id, vae, latents, WINDOW, 64, "cpu", key=case_id)
    latents.set_scale_factor(compute_scale_factor(latents, vae_store.ids(split="train")))
    data = {"store": str(vae_store.path), "latent_root": str(tmp_path / "latents"), "vae_digest": digest,
            "vae_checkpoint": str(vae_path)}

    def config(steps):
        return load_config(None, [
            "diffusion.base=none",  # the image VAE above
            "diffusion.preset=tiny", "diffusion.window_slices=8", "diffusion.overlap_slices=2",
            "diffusion.sample_steps=2", f"train_diffusion.steps={steps}", "train_diffusion.batch_size=2",
            "train_diffusion.val_every=3", "train_diffusion.checkpoint_every=3", "train_diffusion.val_cases=1",
            "train_diffusion.device=cpu", "train_diffusion.processes=2",
        ])

    out = tmp_path / "diffusion"
    reports = []
    summary = launch_training("diffusion", config(3), out, 2, data, reports.append)
    assert summary["step"] == 3 and summary["best_val_psnr"] is not None and reports[-1]["step"] == 3
    last = _load(out / "last.pt")
    assert last["step"] == 3 and last["ema_n_averaged"] == 3
    assert not any(key.startswith("module.") for key in last["train_model"])
    resumed = launch_training("diffusion", config(5), out, 2, data)
    assert resumed["step"] == 5 and resumed["resumed_from"] == 3


def test_a_failed_launch_is_a_runtime_error_with_the_ranks_output(vae_store, tmp_path):
    config = _vae_config(3)
    config.vae.pretrained = tmp_path / "missing.pt"
    with pytest.raises(RuntimeError, match="exited with code"):
        launch_training("vae", config, tmp_path / "vae", 2, {"store": str(vae_store.path)})


def test_an_empty_val_split_fails_before_any_rank_starts(vae_store, tmp_path):
    no_val = CaseStore(shutil.copytree(vae_store.path, tmp_path / "no-val.zarr"))
    no_val.set_splits({case_id: "train" for case_id in no_val.ids()})
    with pytest.raises(ValueError, match="train_vae.validate_on=train"):
        train("vae", _vae_config(3), tmp_path / "vae", {"store": str(no_val.path)})
    assert not (tmp_path / "vae").exists()  # no launch folder: nothing was started
