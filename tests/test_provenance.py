"""What a checkpoint was trained with and on, read back, and the refusals that follow."""

import numpy as np
import pytest
import torch

from ctdiff.errors import UsageError
from ctdiff.provenance import Provenance, common_window
from ctdiff.volume import Volume


def _checkpoints(tmp_path, window=(40.0, 400.0), resolution=32, data=True, name="best.pt"):
    vae = tmp_path / "vae.pt"
    torch.save({"kind": "vae", **({"data": {"train_ids": ["a", "v1"], "val_ids": ["b"]}} if data else {})}, vae)
    diffusion = tmp_path / name
    torch.save({
        "kind": "diffusion",
        "config": {"preprocess": {"window": {"center_hu": window[0], "width_hu": window[1]}, "resolution": resolution}},
        "vae": {"path": str(vae), "relative_path": "vae.pt", "digest": "d" * 32},
        "formulation": {"base": "cubic", "slab_consistency": False},
        **({"data": {"train_ids": ["a", "c"], "val_ids": ["b"], "inplane_px": [resolution, resolution]}} if data else {}),
    }, diffusion)
    return diffusion


def test_read_collects_the_training_cases_of_the_model_and_its_vae(tmp_path):
    p = Provenance.read(_checkpoints(tmp_path))
    assert p.train_ids == {"a", "c", "v1"} and p.val_ids == {"b"}
    assert (p.window, p.inplane_px, p.base, p.vae_digest) == ((40.0, 400.0), (32, 32), "cubic", "d" * 32)


def test_scoring_on_training_cases_is_refused_naming_them(tmp_path):
    p = Provenance.read(_checkpoints(tmp_path))
    p.check_unseen(["b", "t1", "t2"])  # val and test cases may be scored
    with pytest.raises(UsageError, match=r"trained on 2 of the 3 cases to score \(a, v1\)"):
        p.check_unseen(["a", "v1", "t1"])


def test_unrecorded_training_cases_are_unknown_not_refused(tmp_path):
    p = Provenance.read(_checkpoints(tmp_path, data=False))
    assert p.train_ids is None
    p.check_unseen(["a"])


@pytest.mark.parametrize("data", [True, False])  # recorded sizes, or the config's resolution
def test_a_case_at_another_resolution_is_refused(tmp_path, data):
    p = Provenance.read(_checkpoints(tmp_path, resolution=32, data=data))

    def volume(size: int) -> Volume:
        return Volume(np.zeros((2, size, size), np.int16), (5.0, 1.0, 1.0), np.array([0.0, 5.0]))

    p.check_case("ok", volume(32))
    with pytest.raises(UsageError, match="case big is stored at 64x64 px.*trained on 32x32 px cases"):
        p.check_case("big", volume(64))


def test_checkpoints_of_different_windows_are_not_compared(tmp_path):
    (tmp_path / "1").mkdir()
    (tmp_path / "2").mkdir()
    one = Provenance.read(_checkpoints(tmp_path / "1"))
    two = Provenance.read(_checkpoints(tmp_path / "2", window=(-600, 1500)))
    assert common_window([one, one]) == (40.0, 400.0)
    with pytest.raises(UsageError, match="different windows"):
        common_window([one, two])
