"""The residual formulation end to end on held-out data: a tiny residual VAE and diffusion model,
trained through the library (train_vae, latents, train_diffusion) on cases of one seed, must beat
cubic interpolation on a case made from another seed, which no stage ever saw."""

import pytest

from ctdiff.cases import discover_cases
from ctdiff.checkpoint import checkpoint_digest, load_checkpoint, load_vae, save_checkpoint
from ctdiff.config import load_config
from ctdiff.evaluate import baseline_predictors, ceiling_predictor, evaluate_cases, model_predictors
from ctdiff.latents import LatentStore, compute_scale_factor, encode_case, latent_key
from ctdiff.preprocess import decode_case, resize_case
from ctdiff.store import CaseStore
from ctdiff.synth import SynthSpec, synthesize
from ctdiff.thin_slice import ThinSliceModel
from ctdiff.train_diffusion import train_diffusion
from ctdiff.train_vae import train_vae

WINDOW = (40.0, 400.0)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _store(folder, seed: int, n_cases: int, splits: list[str]) -> CaseStore:
    synthesize(folder / "cases", SynthSpec(n_cases=n_cases, size=96, n_thin=60, seed=seed))
    store = CaseStore(folder / "store.zarr")
    store.create()
    refs = sorted(discover_cases(folder / "cases"), key=lambda ref: ref.id)
    for ref in refs:
        decode_case(ref, store)
        resize_case(ref, store, 64)  # the demo's cases and resolution
    store.set_splits({ref.id: split for ref, split in zip(refs, splits)})
    return store


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("residual")
    train_store = _store(root / "train", seed=0, n_cases=6, splits=["train"] * 5 + ["val"])
    test_store = _store(root / "test", seed=101, n_cases=1, splits=["test"])
    config = load_config(None, [
        f"paths.work={root / 'work'}", "diffusion.base=cubic", "diffusion.slab_consistency=true",
        "vae.preset=slice-kl-4x-tiny", "train_vae.steps=500", "train_vae.batch_size=4", "train_vae.patch_slices=4",
        "train_vae.patch_size=64", "train_vae.lr=0.002", "train_vae.val_every=500", "train_vae.val_cases=1",
        "train_vae.device=cpu",
        "diffusion.preset=tiny", "diffusion.window_slices=16", "diffusion.overlap_slices=4", "diffusion.sample_steps=3",
        "train_diffusion.steps=600", "train_diffusion.batch_size=4", "train_diffusion.lr=0.002",
        "train_diffusion.latent_patch=null", "train_diffusion.ema_decay=0.99", "train_diffusion.val_every=300",
        "train_diffusion.val_cases=1", "train_diffusion.device=cpu", "encode.chunk_slices=32",
    ])
    vae_path = train_vae(train_store, root / "work" / "vae", config)["best"]
    vae, payload = load_vae(vae_path)
    digest = checkpoint_digest(vae_path)
    latents = LatentStore(root / "work" / "latents", digest)
    latents.create(vae.preset_name, vae.factors, WINDOW, "cubic")
    for case_id in train_store.ids():
        key = latent_key(train_store.case_key(case_id), digest, WINDOW, 32, "cubic")
        encode_case(train_store, case_id, vae, latents, WINDOW, 32, "cpu", key, "cubic")
    latents.set_scale_factor(compute_scale_factor(latents, train_store.ids(split="train")))
    result = train_diffusion(train_store, latents, vae_path, root / "work" / "diffusion", config)
    return test_store, result, payload, latents


def test_residual_model_beats_cubic_on_a_held_out_case(trained):
    test_store, result, _, _ = trained
    model = ThinSliceModel.load(result["last"])
    assert (model.base, model.slab_consistency) == ("cubic", True)
    predictors = {**baseline_predictors(WINDOW), "vae_ceiling": ceiling_predictor(model, WINDOW),
                  **model_predictors(model, "model", WINDOW, seed=0, samples=4)}
    evaluated = evaluate_cases(test_store, test_store.ids(), WINDOW, predictors)
    between = {m: s["psnr"] for m, s in evaluated.means("in_between").items()}
    hist = {m: s["hist_w1_hu"] for m, s in evaluated.means("in_between").items()}
    print({m: round(v, 2) for m, v in between.items()}, {m: round(v, 2) for m, v in hist.items()})
    best_classical = max(between[m] for m in ("nearest", "linear", "cubic"))
    assert between["vae_ceiling"] > best_classical + 1.0  # the residual VAE leaves room to win
    # Observed (torch 2.13 CPU): cubic 30.59, VAE ceiling 33.68, model 31.57, one sample 31.16 dB
    assert between["model"] > best_classical + 0.5
    assert between["model"] > between["model_1sample"]  # the mean of 4 beats one sample on PSNR
    assert hist["model"] < hist["cubic"]  # and keeps the histogram closer than interpolation's blur
    assert evaluated.best.std and evaluated.best.std["axial"].max() > 0  # the samples differ


def test_checkpoints_record_the_formulation_and_old_ones_load_as_whole_image(trained, tmp_path):
    _, result, vae_payload, latents = trained
    payload = load_checkpoint(result["last"])
    assert payload["formulation"] == {"base": "cubic", "slab_consistency": True}
    assert payload["latent"]["condition_channels"] == 16 and vae_payload["target"]["base"] == "cubic"
    assert latents.base == "cubic" and latents.entry(latents.ids()[0])["condition_shape"][0] == 16
    # A checkpoint from before the formulation is a whole-image model; with this residual VAE it
    # is refused in one line rather than decoding residuals as images.
    del payload["formulation"]
    old = save_checkpoint(tmp_path / "old.pt", payload)
    with pytest.raises(ValueError, match="trained for base 'none'.*for 'cubic'"):
        ThinSliceModel.load(old)
