"""VAE training on two DDP processes under torchrun (gloo, CPU), started as the train-vae task does."""

import pytest
import torch

from ctdiff.config import load_config
from ctdiff.distributed import launch_train_vae, training_processes


def _config(steps: int):
    return load_config(None, [
        "vae.preset=slice-kl-tiny", "train_vae.patch_slices=4", "train_vae.patch_size=32", "train_vae.batch_size=2",
        "train_vae.lr=1e-3", f"train_vae.steps={steps}", "train_vae.val_every=3", "train_vae.checkpoint_every=3",
        "train_vae.val_cases=1", "train_vae.device=cpu", "train_vae.processes=2",
    ])


def test_processes_default_to_one_per_gpu_and_one_on_the_cpu():
    assert training_processes(_config(1).train_vae) == 2
    assert training_processes(load_config(None, ["train_vae.device=cpu"]).train_vae) == 1


def test_two_ranks_train_checkpoint_and_resume(vae_store, tmp_path):
    out = tmp_path / "vae"
    reports = []
    summary = launch_train_vae(vae_store.path, out, _config(3), 2, reports.append)
    assert summary["step"] == 3 and summary["resumed_from"] is None
    assert [r["step"] for r in reports][-1] == 3  # rank 0's progress reached the caller
    last = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert last["step"] == 3 and last["config"]["train_vae"]["processes"] == 2
    assert not any(key.startswith("module.") for key in last["model"])  # saved unwrapped, loadable alone
    assert summary["best_val_psnr"] is not None and (out / "best.pt").is_file()

    resumed = launch_train_vae(vae_store.path, out, _config(6), 2)
    assert resumed["step"] == 6 and resumed["resumed_from"] == 3


def test_a_failed_launch_is_a_runtime_error_with_the_ranks_output(vae_store, tmp_path):
    config = _config(3)
    config.vae.pretrained = tmp_path / "missing.pt"
    with pytest.raises(RuntimeError, match="exited with code"):
        launch_train_vae(vae_store.path, tmp_path / "vae", config, 2)
