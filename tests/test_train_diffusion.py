import shutil

import numpy as np
import pytest
import torch

from ctdiff.autoencoder import CtAutoencoder
from ctdiff.checkpoint import checkpoint_digest, save_checkpoint
from ctdiff.config import load_config
from ctdiff.errors import UsageError
from ctdiff.interpolate import interpolate_z
from ctdiff.latents import LatentStore, compute_scale_factor, encode_case
from ctdiff.store import CaseStore
from ctdiff.synth import SynthSpec, phantom_pair
from ctdiff.thin_slice import ThinSliceModel
from ctdiff.metrics import score
from ctdiff.train_diffusion import train_diffusion
from ctdiff.volume import Volume

WINDOW = (40.0, 400.0)
# At 32 px (11 mm pixels) neighbouring 1 mm slices hardly differ, so interpolation would have
# nothing to miss: the z scale is stretched to 5 mm "thin" slices instead. Case "a" is 5:1
# (25 mm thick), case "b" 3:1 (15 mm thick); noiseless, so PSNR measures anatomy, not noise.
CASES = {"a": (5, 15, "train"), "b": (3, 12, "val")}  # id: (thick/thin ratio, thin slices, split)
THIN_MM = 5.0


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _write_case(store: CaseStore, case_id: str, index: int, ratio: int, n_thin: int) -> None:
    """A synthetic case as preprocessing leaves it: thin cropped to the thick extent, z ascending."""
    spec = SynthSpec(size=32, n_thin=n_thin, thin_mm=THIN_MM, thick_mm=THIN_MM * ratio, noise_hu=0.0)
    thin, thick, geo = phantom_pair(spec, index)
    pixel = spec.pixel_mm

    def volume(hu, z_mm, dz):  # synth writes head first (z descending); the store ascends
        return Volume(np.ascontiguousarray(hu[::-1]).astype(np.int16), (dz, pixel, pixel), z_mm[::-1].copy())

    volumes = {"thick": volume(thick, geo.thick_z_mm, spec.thick_mm),
               "thin": volume(thin[geo.covered], geo.thin_z_mm[geo.covered], spec.thin_mm)}
    store.write_native(case_id, volumes, f"n-{case_id}", {}, 8, 1)
    entry = {"id": case_id, "status": "ok", "reason": None, "category": "APE",
             "n_thick": volumes["thick"].shape[0], "n_thin": n_thin}
    store.write_case(case_id, {}, f"c-{case_id}", entry, 8, 1)


def _train_vae(store: CaseStore, case_ids: list[str], steps: int) -> CtAutoencoder:
    """slice-kl-tiny fitted briefly to these cases' slices (MSE: what PSNR measures)."""
    slices = np.concatenate([store.read(c, k).window(*WINDOW) for c in case_ids for k in ("thin", "thick")])
    torch.manual_seed(0)
    vae = CtAutoencoder("slice-kl-tiny")
    opt = torch.optim.AdamW(vae.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        x = torch.from_numpy(slices[rng.integers(len(slices), size=8)])[None, None]  # (1, 1, 8, H, W)
        recon, _, _ = vae(x)
        loss = (recon - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return vae.eval()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Case store, VAE checkpoint and its latent store (scale factor set), in a work folder."""
    root = tmp_path_factory.mktemp("diffusion")
    store = CaseStore(root / "store.zarr")
    store.create()
    for index, (case_id, (ratio, n_thin, _)) in enumerate(CASES.items()):
        _write_case(store, case_id, index, ratio, n_thin)
    store.set_splits({case_id: split for case_id, (_, _, split) in CASES.items()})
    vae = _train_vae(store, ["a"], steps=300)
    vae_path = save_checkpoint(root / "work" / "checkpoints" / "vae" / "best.pt",
                               {"kind": "vae", "preset": vae.preset_name, "model": vae.net.state_dict()})
    digest = checkpoint_digest(vae_path)
    latents = LatentStore(root / "work" / "latents", digest)
    latents.create(vae.preset_name, vae.factors, WINDOW)
    for case_id in CASES:
        encode_case(store, case_id, vae, latents, WINDOW, 64, "cpu", key=case_id)
    latents.set_scale_factor(compute_scale_factor(latents, ["a"]))
    return store, latents, vae_path, root / "work"


def _config(*overrides: str):
    return load_config(None, [
        "diffusion.base=none", "diffusion.slab_consistency=false",  # the whole-image formulation
        "preprocess.resolution=null",  # the cases above are stored at their native 32 px, and infer resizes to this
        "diffusion.preset=tiny", "diffusion.window_slices=8", "diffusion.overlap_slices=2",
        "diffusion.sample_steps=10", "train_diffusion.batch_size=4", "train_diffusion.lr=2e-3",
        "train_diffusion.ema_decay=0.9", "train_diffusion.val_cases=1", *overrides,
    ])


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _psnr(prediction, target):
    return 10 * np.log10(1.0 / np.mean((prediction - target) ** 2))


# -- the model learns to use its condition ---------------------------------------------------------


@pytest.fixture(scope="module")
def overfit(data, tmp_path_factory):
    """rflow on case "a" alone, long enough to memorise it: ~30 s on one core. (At 500 steps some
    seeds still sample below nearest interpolation.)"""
    store, latents, vae_path, _ = data
    out = tmp_path_factory.mktemp("overfit") / "diffusion"
    config = _config("train_diffusion.steps=800", "train_diffusion.batch_size=16", "train_diffusion.val_every=400",
                     "train_diffusion.checkpoint_every=800")
    reports = []
    result = train_diffusion(store, latents, vae_path, out, config, progress=reports.append)
    return result, out, config, reports


def test_overfit_model_beats_nearest_interpolation(data, overfit):
    store = data[0]
    result, _, _, reports = overfit
    assert result["step"] == 800 and result["resumed_from"] is None
    assert reports[-1]["step"] == 800 and reports[-1]["eta_s"] == 0.0
    model = ThinSliceModel.load(result["last"])
    thick, thin = store.read("a", "thick"), store.read("a", "thin")
    thick_windowed, truth = thick.window(*WINDOW), thin.window(*WINDOW)
    nearest = _psnr(interpolate_z(thick_windowed, thick.z_mm, thin.z_mm, "nearest"), truth)
    ceiling = _psnr(model.ceiling(truth, thick_windowed, thick.z_mm, thin.z_mm), truth)
    steps = []
    first = model.predict(thick_windowed, thick.z_mm, thin.z_mm, seed=0, progress=lambda i, n: steps.append((i, n)))
    assert first.shape == truth.shape and first.dtype == np.float32 and 0 <= first.min() and first.max() <= 1
    assert steps == [(i, 10) for i in range(1, 11)]
    np.testing.assert_array_equal(model.predict(thick_windowed, thick.z_mm, thin.z_mm, seed=0), first)
    psnrs = [_psnr(first, truth)] + [
        _psnr(model.predict(thick_windowed, thick.z_mm, thin.z_mm, seed=seed), truth) for seed in (1, 2)
    ]
    print(f"model {np.round(psnrs, 2)} dB, nearest {nearest:.2f}, VAE ceiling {ceiling:.2f}")
    # Observed (torch 2.13 CPU): 24.2, 26.1, 24.2 dB; nearest 22.9, VAE 26.2. A sample from a
    # one-case model can still land on another memorised window, hence the median.
    assert np.median(psnrs) > nearest + 1.0
    assert ceiling > nearest + 2.0  # the VAE leaves room to win


def test_any_thick_thin_ratio_and_any_target_positions(data, overfit):
    store = data[0]
    result, _, _, _ = overfit
    history = _load(result["last"])["history"]
    assert [r["step"] for r in history if r["val_psnr"] is not None] == [400, 800]  # on the 3:1 case
    model = ThinSliceModel.load(result["best"])
    thick, thin = store.read("b", "thick"), store.read("b", "thin")  # 15 mm -> 5 mm
    out = model.predict(thick.window(*WINDOW), thick.z_mm, thin.z_mm, sample_steps=3)
    assert out.shape == thin.shape
    metrics = score(out, thin.window(*WINDOW))
    assert 10.0 < metrics["psnr"] < 40.0 and 0.0 < metrics["ssim"] <= 1.0
    half = np.arange(thin.z_mm[0], thin.z_mm[-1], 2.5)  # 2.5 mm slices, a spacing never trained on
    assert model.predict(thick.window(*WINDOW), thick.z_mm, half, sample_steps=3).shape == (len(half), 32, 32)
    assert model.thick_mm == 25.0 and model.thin_mm == 5.0  # the training case's
    assert model.window == WINDOW and model.sampler_name == "rflow" and model.sample_steps == 10


# -- checkpoints -----------------------------------------------------------------------------------


def test_checkpoints_are_plain_and_record_what_inference_needs(data, overfit):
    _, latents, vae_path, _ = data
    result, out, config, _ = overfit
    last, best = _load(result["last"]), _load(result["best"])
    for payload in (last, best):
        assert payload["kind"] == "diffusion" and payload["preset"] == "tiny" and payload["sampler"] == "rflow"
        assert payload["config"] == config.model_dump(mode="json")
        assert payload["vae"]["digest"] == latents.vae_digest and payload["vae"]["path"] == str(vae_path.resolve())
        assert payload["latent"] == {"channels": 4, "condition_channels": 4, "factors": [1, 8, 8],
                                     "scale_factor": latents.scale_factor, "vae_preset": "slice-kl-tiny"}
        assert payload["formulation"] == {"base": "none", "slab_consistency": False}
        assert set(payload["rng"]) == {"torch", "noise", "numpy", "cuda"}
        assert payload["data"] == {"train_ids": ["a"], "val_ids": ["b"], "validate_on": "val", "inplane_px": [32, 32]}
        assert payload["model"].keys() == payload["train_model"].keys()
    history = last["history"]
    best_row = max((r for r in history if r["val_psnr"] is not None), key=lambda r: r["val_psnr"])
    assert best["step"] == best_row["step"] and last["best_val_psnr"] == best_row["val_psnr"]
    assert last["ema_n_averaged"] == 800
    assert any(not torch.equal(last["model"][k], last["train_model"][k]) for k in last["model"])  # EMA differs
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ThinSliceModel.load(result["last"]).digest == checkpoint_digest(result["last"])


def test_finished_training_is_not_redone_and_other_kinds_are_refused(data, overfit):
    store, latents, vae_path, _ = data
    result, out, config, _ = overfit
    mtime = (out / "last.pt").stat().st_mtime_ns
    again = train_diffusion(store, latents, vae_path, out, config)
    assert again["step"] == 800 and again["best_val_psnr"] == result["best_val_psnr"]
    assert (out / "last.pt").stat().st_mtime_ns == mtime
    for other in ("diffusion.preset=full", "diffusion.sampler=ddim"):
        with pytest.raises(ValueError, match="paths.work"):
            train_diffusion(store, latents, vae_path, out, _config("train_diffusion.steps=900", other))


def test_model_refuses_a_missing_or_different_vae(data, overfit, tmp_path):
    result = overfit[0]
    payload = _load(result["last"])
    moved = dict(payload, vae={**payload["vae"], "path": str(tmp_path / "gone.pt"), "relative_path": "gone.pt"})
    save_checkpoint(tmp_path / "moved.pt", moved)
    with pytest.raises(ValueError, match="missing"):
        ThinSliceModel.load(tmp_path / "moved.pt")
    other_vae = save_checkpoint(tmp_path / "vae.pt", {"kind": "vae", "preset": "slice-kl-tiny",
                                                      "model": CtAutoencoder("slice-kl-tiny").net.state_dict()})
    save_checkpoint(tmp_path / "other.pt", dict(payload, vae={**payload["vae"], "path": str(other_vae)}))
    with pytest.raises(ValueError, match="digest"):
        ThinSliceModel.load(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a ctdiff diffusion checkpoint"):
        ThinSliceModel.load(data[2])


# -- resume and set-up errors ----------------------------------------------------------------------


class _Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing in the trainer may catch it."""


@pytest.mark.parametrize("sampler", ["rflow", "ddim"])
def test_killed_run_resumes_to_identical_weights(data, tmp_path, sampler):
    store, latents, vae_path, _ = data
    config = _config(f"diffusion.sampler={sampler}", "train_diffusion.steps=8", "train_diffusion.checkpoint_every=4",
                     "train_diffusion.val_every=3", "train_diffusion.latent_patch=4", "diffusion.sample_steps=2")
    a = train_diffusion(store, latents, vae_path, tmp_path / "a", config)

    def kill_after_first_checkpoint(report):
        if (tmp_path / "b" / "last.pt").is_file():
            raise _Killed

    with pytest.raises(_Killed):
        train_diffusion(store, latents, vae_path, tmp_path / "b", config, progress=kill_after_first_checkpoint)
    assert _load(tmp_path / "b" / "last.pt")["step"] == 4
    b = train_diffusion(store, latents, vae_path, tmp_path / "b", config)
    assert b["resumed_from"] == 4 and a["resumed_from"] is None and b["step"] == 8
    last_a, last_b = _load(a["last"]), _load(b["last"])
    for part in ("model", "train_model"):
        for key, tensor in last_a[part].items():
            assert torch.equal(tensor, last_b[part][key]), f"{part}.{key}"
    assert last_a["history"] == last_b["history"]  # losses and val metrics, step by step
    assert [r["step"] for r in last_a["history"] if r["val_psnr"] is not None] == [3, 6, 8]


def test_an_empty_val_split_is_an_error_unless_validating_on_train_is_asked_for(data, tmp_path):
    store, latents, vae_path, _ = data
    no_val = CaseStore(shutil.copytree(store.path, tmp_path / "no-val.zarr"))
    no_val.set_splits({"a": "train", "b": "test"})
    config = _config("train_diffusion.steps=2", "train_diffusion.latent_patch=4", "diffusion.sample_steps=2")
    with pytest.raises(UsageError, match=r"^no val cases in .*no-val\.zarr: set preprocess\.split .*"
                                         r"or set train_diffusion\.validate_on=train to validate on training cases$"):
        train_diffusion(no_val, latents, vae_path, tmp_path / "d", config)
    assert not (tmp_path / "d").exists()  # refused before training

    config.train_diffusion.validate_on = "train"
    result = train_diffusion(no_val, latents, vae_path, tmp_path / "d", config)
    assert result["step"] == 2 and result["best_val_psnr"] is not None
    for name in ("last", "best"):  # "b" has latents, but it is a test case: windows never draw from it
        assert _load(result[name])["data"] == {"train_ids": ["a"], "val_ids": ["a"], "validate_on": "train",
                                               "inplane_px": [32, 32]}


def test_unusable_latent_stores_are_clear_errors(data, tmp_path):
    store, latents, vae_path, _ = data
    config = _config("train_diffusion.steps=2")
    empty = LatentStore(tmp_path / "latents", latents.vae_digest)
    with pytest.raises(ValueError, match="encode-latents"):
        train_diffusion(store, empty, vae_path, tmp_path / "d", config)
    unscaled = LatentStore(tmp_path / "latents", latents.vae_digest)
    unscaled.create("slice-kl-tiny", (1, 8, 8), WINDOW)
    unscaled.write_case("a", {"thick": latents.read("a", "thick"), "thin": latents.read("a", "thin")}, latents.case_attrs("a"))
    with pytest.raises(ValueError, match="scale factor"):
        train_diffusion(store, unscaled, vae_path, tmp_path / "d", config)
    other = LatentStore(tmp_path / "latents", "another-vae")
    other.create("slice-kl-tiny", (1, 8, 8), WINDOW)
    other.write_case("a", {"thick": latents.read("a", "thick"), "thin": latents.read("a", "thin")}, latents.case_attrs("a"))
    other.set_scale_factor(1.0)
    with pytest.raises(ValueError, match="latents of VAE"):
        train_diffusion(store, other, vae_path, tmp_path / "d", config)
    with pytest.raises(ValueError, match="window_slices"):
        train_diffusion(store, latents, vae_path, tmp_path / "d", _config("train_diffusion.steps=2", "diffusion.window_slices=7"))
    assert not (tmp_path / "d" / "last.pt").exists()


# -- `ctdiff infer` with the trained checkpoint ----------------------------------------------------


def test_cli_infer_turns_a_thick_zip_into_thin_nifti_and_dicom(data, overfit, tmp_path, capsys):
    import nibabel as nib

    from ctdiff.dicom import read_series
    from ctdiff.nifti import read_nifti
    from ctdiff.synth import write_case
    from flows.cli import main

    store = data[0]
    result = overfit[0]
    # Case "a" again, as a DICOM ZIP (thick and thin series): infer reads the thickest series.
    ratio, n_thin, _ = CASES["a"]
    spec = SynthSpec(size=32, n_thin=n_thin, thin_mm=THIN_MM, thick_mm=THIN_MM * ratio, noise_hu=0.0)
    case = write_case(tmp_path / "in", spec, 0)
    out = tmp_path / "thin.nii.gz"
    assert main(["infer", "--checkpoint", result["last"], "--input", str(case), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    # infer.samples defaults to 4: the mean is written, and the samples' std in HU beside it
    assert str(out) in printed and f"sample std in HU: {tmp_path / 'thin_std.nii.gz'}" in printed

    thick, thin = store.read("a", "thick"), store.read("a", "thin")
    image = nib.load(out)
    std_image = nib.load(tmp_path / "thin_std.nii.gz")
    assert std_image.shape == image.shape and np.allclose(std_image.affine, image.affine)
    assert np.asarray(std_image.dataobj).min() >= 0 and np.asarray(std_image.dataobj).max() > 0
    assert image.shape == (32, 32, n_thin) and image.header.get_zooms()[2] == pytest.approx(THIN_MM)
    hu = np.asarray(image.dataobj)
    assert hu.min() <= -1000 and hu.max() > 200  # full HU range, not the window
    # The CLI's volume (model inside the window, cubic outside) against the truth, in the window.
    predicted = read_nifti(out)
    np.testing.assert_allclose(predicted.z_mm, thin.z_mm, atol=1e-3)
    truth = thin.window(*WINDOW)
    nearest = _psnr(interpolate_z(thick.window(*WINDOW), thick.z_mm, thin.z_mm, "nearest"), truth)
    assert _psnr(predicted.window(*WINDOW), truth) > nearest + 0.5

    # A folder of cases to DICOM series; same seed, same HU as the NIfTI.
    assert main(["infer", "--checkpoint", result["last"], "--input", str(tmp_path / "in"), "--batch",
                 "--format", "dicom", "--output", str(tmp_path / "series")]) == 0
    series = read_series(tmp_path / "series" / case.stem)
    assert series.volume.spacing_mm[0] == pytest.approx(THIN_MM)
    np.testing.assert_allclose(series.volume.z_mm, thin.z_mm, atol=1e-3)
    np.testing.assert_array_equal(series.volume.hu, predicted.hu)


def test_cli_infer_errors_are_one_line_with_an_exit_code(data, overfit, tmp_path, capsys):
    from ctdiff.synth import write_case
    from flows.cli import main

    result = overfit[0]
    case = write_case(tmp_path / "in", SynthSpec(size=16, n_thin=10, thin_mm=1.0, thick_mm=5.0, noise_hu=0.0), 0)
    args = ["infer", "--input", str(case), "--output", str(tmp_path / "o.nii.gz")]
    assert main([*args, "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "no such diffusion checkpoint" in capsys.readouterr().err
    # 5 mm slices are not thicker than the model's 5 mm output: the case is refused, nothing written.
    assert main([*args, "--checkpoint", result["last"]]) == 1
    assert "not thicker than 5 mm" in capsys.readouterr().err
    assert not (tmp_path / "o.nii.gz").exists()
    assert main(["infer", "--checkpoint", result["last"], "--input", str(case), "--output", str(tmp_path / "o.nrrd")]) == 2


def test_checkpoint_from_before_the_residual_formulation_still_loads(data, overfit, tmp_path):
    """Checkpoints written before `formulation` existed hold whole-image models: they load as
    base none without slab consistency and sample exactly as before."""
    store = data[0]
    result = overfit[0]
    payload = _load(result["last"])
    assert payload["formulation"] == {"base": "none", "slab_consistency": False}
    del payload["formulation"]
    payload["latent"].pop("condition_channels")
    old = save_checkpoint(tmp_path / "old.pt", payload)
    model, current = ThinSliceModel.load(old), ThinSliceModel.load(result["last"])
    assert (model.base, model.slab_consistency) == ("none", False)
    thick, thin = store.read("a", "thick"), store.read("a", "thin")
    args = (thick.window(*WINDOW), thick.z_mm, thin.z_mm)
    np.testing.assert_array_equal(model.predict(*args, sample_steps=2), current.predict(*args, sample_steps=2))
