import math

import numpy as np
import pytest
import torch

from ctdiff.config import load_config
from ctdiff.samplers import DdimSampler, RectifiedFlowSampler, make_sampler, min_snr_weight
from ctdiff.sliding import overlap_fraction, sample_volume, windowed

T = 1000
C = 2  # latent channels in these tests


def _alpha_bar(t: torch.Tensor) -> torch.Tensor:
    """Cosine schedule (Nichol & Dhariwal 2021, eq. 17, s = 0.008) with betas clipped at 0.999,
    written here from the paper, independently of MONAI."""
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, 0)[t.long()]


def _split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[:, :C], x[:, C:]  # noisy latent, condition


def _oracle(sampler, x0_of) -> callable:
    """A model that knows the clean latent (`x0_of(cond)`) and answers what the sampler trains for."""

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x_t, cond = _split(x)
        x0 = x0_of(cond).double()
        x_t = x_t.double()
        if isinstance(sampler, RectifiedFlowSampler):  # x_t = (1 - s) x0 + s noise; v = x0 - noise
            s = (t.double() / T)[:, None, None, None, None]
            return ((x0 - x_t) / s).float()
        a = _alpha_bar(t)[:, None, None, None, None]
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        return (eps if sampler.prediction == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0).float()

    return model_fn


SAMPLERS = {
    "ddim-epsilon": lambda: DdimSampler(T, "epsilon", 5.0),
    "ddim-v": lambda: DdimSampler(T, "v_prediction", 5.0),
    "rflow": lambda: RectifiedFlowSampler(T),
}


def _latents(seed: int, shape=(3, C, 4, 2, 2)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# -- schedules ---------------------------------------------------------------------------------------


def test_ddpm_schedule_is_the_cosine_schedule():
    sampler = DdimSampler(T, "v_prediction", 5.0)
    t = torch.arange(T)
    np.testing.assert_allclose(sampler.noise_scheduler.alphas_cumprod.double(), _alpha_bar(t), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(sampler.scheduler.alphas_cumprod.double(), _alpha_bar(t), rtol=1e-4, atol=1e-7)


def test_ddim_timesteps_move_by_what_monai_step_assumes():
    sampler = DdimSampler(T, "epsilon", None)
    assert sampler.timesteps(20).tolist() == list(range(999, 0, -50))
    assert sampler.timesteps(3).tolist() == [998, 665, 332]
    assert sampler.timesteps(1).tolist() == [999]
    for steps in (7, 30):
        timesteps = sampler.timesteps(steps)
        assert len(timesteps) == steps and set(torch.diff(timesteps).tolist()) == {-(T // steps)}
        assert timesteps[-1] - T // steps < 0  # the last step lands on alpha_bar = 1
    with pytest.raises(ValueError, match="sample_steps"):
        sampler.timesteps(T + 1)


def test_rflow_timesteps_are_monais():
    assert RectifiedFlowSampler(T).timesteps(3).tolist() == [1000, 667, 333]
    assert RectifiedFlowSampler(T).timesteps(20).tolist() == list(range(1000, 0, -50))


def test_min_snr_weights():
    snr = torch.tensor([0.5, 5.0, 20.0])
    np.testing.assert_allclose(min_snr_weight(snr, 5.0, "epsilon"), [1.0, 1.0, 0.25])
    np.testing.assert_allclose(min_snr_weight(snr, 5.0, "v_prediction"), [0.5 / 1.5, 5.0 / 6.0, 5.0 / 21.0])
    np.testing.assert_array_equal(min_snr_weight(snr, None, "epsilon"), [1.0, 1.0, 1.0])


def test_make_sampler_follows_the_config():
    config = load_config(None, ["diffusion.sampler=ddim", "diffusion.prediction=epsilon", "diffusion.min_snr_gamma=null"])
    sampler = make_sampler(config.diffusion)
    assert isinstance(sampler, DdimSampler) and sampler.prediction == "epsilon" and sampler.min_snr_gamma is None
    rflow = make_sampler(load_config(None, ["diffusion.sampler=rflow"]).diffusion)
    assert isinstance(rflow, RectifiedFlowSampler) and rflow.prediction == "v_prediction"


# -- training loss -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SAMPLERS)
def test_a_perfect_model_has_zero_loss_and_padding_never_counts(name):
    sampler = SAMPLERS[name]()
    x0, cond = _latents(0), _latents(1)
    mask = torch.ones(3, 1, 4, 2, 2)
    mask[:, :, 3:] = 0  # the last slice is padding
    perfect = _oracle(sampler, lambda c: x0)

    def wrong_in_padding(x, t):
        return perfect(x, t) + 100.0 * (1 - mask)

    generator = torch.Generator().manual_seed(0)
    assert sampler.training_loss(wrong_in_padding, x0, cond, mask, generator).item() < 1e-6
    assert sampler.training_loss(lambda x, t: perfect(x, t) + 0.1, x0, cond, mask, generator).item() > 1e-3


def test_ddpm_loss_is_min_snr_weighted_mse():
    """Golden: replay the generator to get the same t and noise, weigh by the paper's formula."""
    sampler = DdimSampler(T, "epsilon", 5.0)
    x0, cond, mask = _latents(0), _latents(1), torch.ones(3, 1, 4, 2, 2)
    generator = torch.Generator().manual_seed(3)
    replay = torch.Generator().manual_seed(3)
    loss = sampler.training_loss(lambda x, t: torch.zeros_like(x[:, :C]), x0, cond, mask, generator)
    t = torch.randint(0, T, (3,), generator=replay)
    noise = torch.randn(x0.shape, generator=replay)
    snr = _alpha_bar(t) / (1 - _alpha_bar(t))
    expected = (torch.clamp(snr, max=5.0) / snr * noise.double().pow(2).flatten(1).mean(1)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_rflow_loss_is_masked_velocity_mse():
    sampler = RectifiedFlowSampler(T)
    x0, cond = _latents(0), _latents(1)
    mask = torch.zeros(3, 1, 4, 2, 2)
    mask[:, :, :2] = 1
    generator, replay = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    loss = sampler.training_loss(lambda x, t: torch.zeros_like(x[:, :C]), x0, cond, mask, generator)
    torch.rand(3, generator=replay)  # the times
    noise = torch.randn(x0.shape, generator=replay)
    expected = (x0 - noise)[:, :, :2].pow(2).mean()  # every sample has the same number of voxels
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


# -- sampling ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("steps", [1, 7, 20])
def test_an_oracle_model_samples_the_clean_latent(name, steps):
    sampler = SAMPLERS[name]()
    x0 = _latents(0)
    out = sampler.sample(_oracle(sampler, lambda c: x0), _latents(1), steps, torch.Generator().manual_seed(0))
    # epsilon -> x0 divides float32 rounding by sqrt(alpha_bar), ~0.01 at t = 999
    np.testing.assert_allclose(out, x0, rtol=0, atol=1e-2 if name == "ddim-epsilon" else 1e-4)


def test_rflow_euler_steps_add_up_to_one_unit_of_time():
    # A constant velocity c carries the starting noise to noise + c, whatever the step count.
    sampler = RectifiedFlowSampler(T)
    cond = _latents(1)
    for steps in (1, 3, 7):
        out = sampler.sample(lambda x, t: torch.full_like(x[:, :C], 0.5), cond, steps, torch.Generator().manual_seed(9))
        start = torch.randn(cond.shape, generator=torch.Generator().manual_seed(9))
        np.testing.assert_allclose(out, start + 0.5, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", SAMPLERS)
def test_sampling_is_deterministic_for_a_seed_and_reports_progress(name):
    sampler = SAMPLERS[name]()
    torch.manual_seed(0)
    weights = torch.randn(C, 2 * C)

    def model_fn(x, t):  # a fixed non-trivial map, so the output depends on every draw
        return torch.einsum("oc,bcdhw->bodhw", weights, x).tanh() * (1 + t[:, None, None, None, None] / T)

    cond = _latents(1)
    seen = []
    a = sampler.sample(model_fn, cond, 5, torch.Generator().manual_seed(4), lambda i, n: seen.append((i, n)))
    b = sampler.sample(model_fn, cond, 5, torch.Generator().manual_seed(4))
    c = sampler.sample(model_fn, cond, 5, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert seen == [(i, 5) for i in range(1, 6)]


# -- sliding windows ---------------------------------------------------------------------------------


def test_overlap_fraction_gives_monai_the_exact_stride():
    for window in range(1, 65):
        for overlap in range(window):
            assert int(window * (1 - overlap_fraction(window, overlap))) == window - overlap, (window, overlap)
    with pytest.raises(ValueError, match="overlap_slices"):
        overlap_fraction(8, 8)


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("depth", [3, 8, 13, 30])
def test_windowed_sampling_of_any_depth_returns_what_the_model_knows(name, depth):
    # A per-voxel oracle (clean latent = 2 * condition) gives the same answer in every window,
    # so blending must reproduce it exactly: padding, cropping and blending are bookkeeping only.
    sampler = SAMPLERS[name]()
    cond = _latents(2, shape=(C, depth, 3, 5))[:, :, :, :]  # (C, D, H, W): H, W not multiples of 2
    out = sample_volume(sampler, _oracle(sampler, lambda c: 2 * c), cond, 8, 2, 2, 6, torch.Generator().manual_seed(0))
    assert out.shape == cond.shape
    np.testing.assert_allclose(out, 2 * cond, rtol=0, atol=1e-3 if name == "ddim-epsilon" else 1e-4)


def test_windows_are_blended_at_every_step():
    calls = []

    def model_fn(x, t):
        calls.append(tuple(x.shape))
        return torch.zeros_like(x[:, :C])

    sampler = RectifiedFlowSampler(T)
    seen = []
    sample_volume(sampler, model_fn, _latents(0, shape=(C, 13, 3, 4)), 8, 2, 2, 4, torch.Generator(),
                  progress=lambda i, n: seen.append(i), window_batch=1)
    # 13 slices in windows of 8, 6 apart: starts 0 and 5 (the last one flush with the end).
    assert calls == [(1, 2 * C, 8, 4, 4)] * 8 and seen == [1, 2, 3, 4]


def test_blend_tapers_between_windows():
    # A model whose answer is constant per window (the window's mean depth coordinate): the blend
    # must rise monotonically from the first window's value to the last's, with no jumps.
    def model_fn(x, t):
        return x[:, :1].mean(dim=(2, 3, 4), keepdim=True).expand(-1, 1, *x.shape[2:]).clone()

    depth = 30
    coordinate = torch.arange(depth, dtype=torch.float32)[None, None, :, None, None].expand(1, 2, depth, 2, 2)
    out = windowed(model_fn, 8, 4)(coordinate, torch.zeros(1))[0, 0, :, 0, 0]  # (D,)
    assert out[0] == pytest.approx(3.5) and out[-1] == pytest.approx(25.5)  # first and last window means
    assert torch.all(torch.diff(out) >= -1e-5) and torch.diff(out).max() < 1.5  # a cross-fade, not a seam
    np.testing.assert_allclose(out[4:22], torch.arange(4.0, 22.0), atol=1e-5)  # linear where windows are 4 apart
