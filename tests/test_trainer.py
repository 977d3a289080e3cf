"""The one training loop (ctdiff.training_loop.Trainer): cadence, best/last, resume, DDP ranks,
and checkpoints that survive `kill -9` in the middle of a write."""

import datetime
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import ctdiff
from ctdiff.checkpoint import save_checkpoint
from ctdiff.config import load_config
from ctdiff.training_loop import Distributed, Trainer, numpy_rng, setup_distributed
from ctdiff.train_vae import train_vae

REPO = Path(ctdiff.__file__).resolve().parent.parent


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


class _Walk:
    """A TrainingRun without a network: its one "weight" is a random walk drawn from its own
    generator, and validation returns scripted PSNRs in turn."""

    title = "walk"

    def __init__(self, psnrs=()):
        self.rng, self.weight, self.psnrs = np.random.default_rng(0), 0.0, list(psnrs)
        self.rngs = [numpy_rng("numpy", self)]

    def rng_state(self):
        return self.rng.bit_generator.state

    def set_rng_state(self, state):
        self.rng.bit_generator.state = state

    def load(self, checkpoint):
        self.weight = checkpoint["weight"]

    def train_step(self, step):
        self.weight += float(self.rng.normal())
        return {"loss": abs(self.weight)}

    def validate(self):
        return {"val_psnr": self.psnrs.pop(0), "val_ssim": 0.5}

    def payload(self):
        return {"kind": "walk", "weight": self.weight}


def _walk_config(steps: int, val_every: int = 3, checkpoint_every: int = 2):
    return load_config(None, [f"train_vae.steps={steps}", f"train_vae.val_every={val_every}",
                              f"train_vae.checkpoint_every={checkpoint_every}"])


CASES = {"train_ids": ["a", "b"], "val_ids": ["c"], "validate_on": "val"}


class _Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing in the trainer may catch it."""


def test_cadence_best_and_last_checkpoints(tmp_path, monkeypatch):
    config = _walk_config(7)
    saved = []
    original = save_checkpoint

    def recording(path, payload):
        saved.append((Path(path).name, payload["step"]))
        return original(path, payload)

    monkeypatch.setattr("ctdiff.training_loop.save_checkpoint", recording)
    reports = []
    summary = Trainer(tmp_path, config, config.train_vae).run(_Walk([10.0, 12.0, 11.0]), Distributed(), CASES,
                                                               reports.append)
    # validate at 3, 6 and the last step; last.pt every 2 steps and at the last; best.pt on improvement
    assert saved == [("last.pt", 2), ("best.pt", 3), ("last.pt", 4), ("best.pt", 6), ("last.pt", 6), ("last.pt", 7)]
    last, best = _load(tmp_path / "last.pt"), _load(tmp_path / "best.pt")
    validated = [(r["step"], r["val_psnr"]) for r in last["history"] if r["val_psnr"] is not None]
    assert validated == [(3, 10.0), (6, 12.0), (7, 11.0)]
    assert best["step"] == 6 and last["best_val_psnr"] == best["best_val_psnr"] == 12.0
    assert last["data"] == CASES and last["config"] == config.model_dump(mode="json") and last["kind"] == "walk"
    assert summary == {"step": 7, "best_val_psnr": 12.0, "last": str(tmp_path / "last.pt"),
                       "best": str(tmp_path / "best.pt"), "loss_plot": str(tmp_path / "loss.png"), "resumed_from": None}
    assert reports[-1]["step"] == 7 and reports[-1]["val_psnr"] == 11.0


def test_zero_steps_records_the_initial_weights_with_one_validation(tmp_path):
    config = _walk_config(0)
    summary = Trainer(tmp_path, config, config.train_vae).run(_Walk([9.0]), Distributed(), CASES)
    assert summary["step"] == 0 and summary["best_val_psnr"] == 9.0
    assert _load(tmp_path / "last.pt")["history"] == [{"step": 0, "loss": None, "val_psnr": 9.0, "val_ssim": 0.5}]
    assert _load(tmp_path / "best.pt")["step"] == 0


def test_resume_restores_the_generators_and_removes_stray_temporaries(tmp_path):
    config = _walk_config(9)
    Trainer(tmp_path / "a", config, config.train_vae).run(_Walk([1.0, 2.0, 3.0]), Distributed(), CASES)

    def kill_after_step_4(report):  # its checkpoint is written
        if report["step"] == 4:
            raise _Killed

    with pytest.raises(_Killed):
        Trainer(tmp_path / "b", config, config.train_vae).run(_Walk([1.0, 2.0, 3.0]), Distributed(), CASES,
                                                              kill_after_step_4)
    stray = tmp_path / "b" / ".last.pt.0123abcd.tmp.pt"
    stray.write_bytes(b"half a checkpoint")  # as a kill in the middle of a write leaves it
    trainer = Trainer(tmp_path / "b", config, config.train_vae)
    assert trainer.resumed_from == 4 and not trainer.finished and not stray.exists()
    summary = trainer.run(_Walk([2.0, 3.0]), Distributed(), CASES)
    assert summary["resumed_from"] == 4
    a, b = _load(tmp_path / "a" / "last.pt"), _load(tmp_path / "b" / "last.pt")
    assert a["weight"] == b["weight"] and a["history"] == b["history"]  # the same draws, step by step
    assert Trainer(tmp_path / "b", config, config.train_vae).finished


def test_ddp_ranks_reseed_on_resume_and_only_rank_0_writes(tmp_path, monkeypatch):
    barriers = []
    monkeypatch.setattr(torch.distributed, "barrier", lambda: barriers.append(1))
    config = _walk_config(4)
    Trainer(tmp_path, config, config.train_vae).run(_Walk([1.0, 2.0]), Distributed(), CASES)
    more = _walk_config(6)
    walk = _Walk()
    summary = Trainer(tmp_path, more, more.train_vae).run(walk, Distributed(rank=1, world_size=2), CASES)
    assert summary["step"] == 6 and summary["resumed_from"] == 4 and summary["best_val_psnr"] == 2.0
    assert _load(tmp_path / "last.pt")["step"] == 4  # rank 1 validated and wrote nothing
    assert barriers == [1]  # at step 6 (validation and checkpoint), while rank 0 validates and writes
    reference = np.random.default_rng([more.train_vae.seed, 1, 4])  # (seed, rank, step)
    expected = _load(tmp_path / "last.pt")["weight"] + reference.normal() + reference.normal()
    assert walk.weight == expected


def test_setup_distributed_gives_the_process_group_its_timeout(monkeypatch):
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda backend, timeout: calls.append((backend, timeout)))
    config = load_config(None, ["train_vae.device=cpu", "train_vae.ddp_timeout_min=45"])
    dist, device = setup_distributed(config.train_vae)
    assert (dist.rank, dist.world_size, device.type) == (1, 2, "cpu")
    assert calls == [("gloo", datetime.timedelta(minutes=45))]


def test_save_checkpoint_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def recording_replace(source, target):
        events.append(("replace", str(source), str(target)))
        replace(source, target)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    path = save_checkpoint(tmp_path / "last.pt", {"step": 1})
    (_, tmp), (_, source, target), (_, folder) = events
    assert tmp == source and Path(tmp).name.startswith(".last.pt.") and target == str(path)
    assert folder == str(tmp_path) and _load(path) == {"step": 1}


# -- kill -9 ---------------------------------------------------------------------------------------

# A training process whose checkpoint writes pause half way (0.05 s after half the bytes), so a
# kill can be aimed at the middle of one; everything else is the real save_checkpoint. Loss
# plots are left out: not under test, and at 0.4 s each they would be most of the run.
_DRIVER = textwrap.dedent("""
    import io, json, sys, time
    from pathlib import Path
    import torch

    torch.set_num_threads(1)
    _save = torch.save

    def halting_save(obj, f):
        buffer = io.BytesIO()
        _save(obj, buffer)
        data = buffer.getvalue()
        with open(f, "wb") as out:
            out.write(data[: len(data) // 2])
            out.flush()
            time.sleep(0.05)
            out.write(data[len(data) // 2:])

    torch.save = halting_save
    import ctdiff.training_loop
    ctdiff.training_loop.plot_training_curves = lambda *args, **kwargs: None
    from ctdiff.config import load_config
    from ctdiff.store import CaseStore
    from ctdiff.train_vae import train_vae

    result = train_vae(CaseStore(sys.argv[1]), Path(sys.argv[2]), load_config(None, sys.argv[3:]))
    print(json.dumps(result))
""")
_STEPS = 40


def _kill_config():
    return [
        "vae.preset=slice-kl-tiny", "diffusion.base=none", "train_vae.patch_slices=4", "train_vae.patch_size=32",
        "train_vae.batch_size=2", "train_vae.lr=1e-3", f"train_vae.steps={_STEPS}", "train_vae.checkpoint_every=1",
        f"train_vae.val_every={_STEPS}", "train_vae.val_cases=1", "train_vae.device=cpu",
    ]


def _start(driver: Path, store, out: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, str(driver), str(store.path), str(out), *_kill_config()],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _temporaries(out: Path) -> list[Path]:
    return sorted(out.glob(".last.pt.*.tmp*")) if out.is_dir() else []


def _wait_for_write(proc: subprocess.Popen, out: Path, nth: int, timeout_s: float = 60.0) -> None:
    """Until the `nth` temporary last.pt this process writes appears (polled every ms); the
    strays of earlier kills, there until training starts again, do not count."""
    strays = set(_temporaries(out))
    seen: set[Path] = set()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        seen.update(set(_temporaries(out)) - strays)
        if len(seen) >= nth:
            return
        time.sleep(0.001)
    raise AssertionError(f"no {nth}th checkpoint write within {timeout_s} s; stderr: {proc.stderr.read()[-2000:]}")


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    proc.stderr.close()


@pytest.mark.usefixtures("one_torch_thread")
def test_checkpoints_survive_kill_9_and_training_resumes_to_the_same_weights(vae_store, tmp_path, monkeypatch):
    driver = tmp_path / "drive.py"
    driver.write_text(_DRIVER)
    out = tmp_path / "vae"
    moments = random.Random(0)
    kills = [("write", 1), ("random", moments.uniform(0.0, 0.6)), ("write", 3), ("random", moments.uniform(0.0, 0.6))]
    outcomes = []
    for how, when in kills:
        proc = _start(driver, vae_store, out)
        if how == "write":
            _wait_for_write(proc, out, when)
        else:  # at a random moment after training is under way (imports take seconds)
            _wait_for_write(proc, out, 1)
            time.sleep(when)
        assert proc.poll() is None, "the run ended before it was killed: raise _STEPS"
        _kill(proc)
        stray = bool(_temporaries(out))  # the kill landed before a write's rename
        step = None
        if (out / "last.pt").is_file():
            last = _load(out / "last.pt")  # never half a file, whatever the moment
            step = last["step"]
            assert len(last["history"]) == step < _STEPS
        outcomes.append((how, step, stray))
    print("kills (how, last.pt step, stray temporary):", outcomes)
    assert sum(stray for _, _, stray in outcomes) >= 2 and outcomes[-1][1] >= 1

    proc = _start(driver, vae_store, out)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    resumed = json.loads(stdout.strip().splitlines()[-1])
    assert resumed["resumed_from"] is not None and resumed["step"] == _STEPS
    assert not _temporaries(out)  # the strays of the killed writes are gone

    # Every kill fell after a complete checkpoint or before a rename: resume is exact.
    monkeypatch.setattr("ctdiff.training_loop.plot_training_curves", lambda *args, **kwargs: None)
    straight = train_vae(vae_store, tmp_path / "straight", load_config(None, _kill_config()))
    a, b = _load(straight["last"]), _load(resumed["last"])
    assert a["history"] == b["history"]
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
