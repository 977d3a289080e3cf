"""Two ways to train and sample the latent diffusion model, behind one interface.

- `DdimSampler`: DDPM training on the cosine schedule (Nichol & Dhariwal 2021), predicting the
  noise (epsilon) or the velocity v (Salimans & Ho 2022), with min-SNR-gamma loss weights (Hang
  et al. 2023); sampled deterministically with DDIM (Song et al. 2021, eta = 0) in N steps.
- `RectifiedFlowSampler`: rectified flow (Liu et al. 2023) predicting the velocity x0 - noise,
  time drawn uniformly (MONAI's default); sampled with N Euler steps.

Both use MONAI's schedulers (`DDPMScheduler`, `DDIMScheduler`, `RFlowScheduler`) for the noise
and the update maths. Every random draw comes from a caller's `torch.Generator` (MONAI's
`RFlowScheduler.sample_timesteps` draws from the global RNG, so the time is drawn here), on the
CPU, so a seed gives the same noise on any device.

Sampling draws its starting noise from one generator per volume of the batch (`initial_noise`),
so sample k of a batch is exactly the sample that generator alone would give: K samples with
seeds s..s+K-1 can run as one batch.

Notation: x0 the clean (scaled) thin latent, x_t the noisy one at time t, cond the condition,
alpha_bar(t) the cumulative signal fraction, SNR(t) = alpha_bar / (1 - alpha_bar).
`model_fn(torch.cat([x_t, cond], 1), t)` -> (B, C, D, H, W), t of shape (B,).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler

from ctdiff.config import DiffusionConfig

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepProgress = Callable[[int, int], None]
Generators = torch.Generator | Sequence[torch.Generator]


def initial_noise(shape: torch.Size | tuple[int, ...], generators: Generators) -> torch.Tensor:
    """Standard normal noise (B, ...) on the CPU, volume b from generators[b] (one generator:
    the whole batch from it, as `torch.randn(shape, generator=g)`)."""
    if isinstance(generators, torch.Generator):
        return torch.randn(shape, generator=generators)
    if len(generators) != shape[0]:
        raise ValueError(f"{len(generators)} generators for a batch of {shape[0]}")
    return torch.stack([torch.randn(tuple(shape[1:]), generator=g) for g in generators])


class Sampler(Protocol):
    """What training and inference use; `DdimSampler` and `RectifiedFlowSampler` implement it."""

    name: str  # the diffusion.sampler value
    prediction: str  # what the network predicts: epsilon or v_prediction
    train_timesteps: int

    def training_loss(
        self, model_fn: ModelFn, x0: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """Scalar loss of `model_fn` on clean latents x0 (B, C, D, H, W) with condition and mask."""
        ...

    def timesteps(self, steps: int) -> torch.Tensor:
        """The descending timesteps that `sample` visits in `steps` steps."""
        ...

    def sample(
        self, model_fn: ModelFn, cond: torch.Tensor, steps: int, generator: Generators,
        progress: StepProgress | None = None, channels: int | None = None,
    ) -> torch.Tensor:
        """Clean latents (B, channels, ...) for a condition (B, C_cond, ...) (channels: C_cond when
        None), from noise drawn with `generator` (see `initial_noise`)."""
        ...


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error over the voxels where mask is 1: (B,).

    `mask` (B, 1, D, H, W) marks real latent voxels; padding never counts.
    """
    squared = (prediction.float() - target.float()).pow(2) * mask  # (B, C, D, H, W)
    voxels = mask.flatten(1).sum(1) * prediction.shape[1]  # (B,) counted elements
    return squared.flatten(1).sum(1) / voxels.clamp_min(1.0)


def min_snr_weight(snr: torch.Tensor, gamma: float | None, prediction: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, eq. 9 and its v-prediction form).

    The weight that makes an epsilon- or v-loss equal to min(SNR, gamma) times the x0-loss:
    min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v. gamma None: plain MSE.
    Either way the x0-loss weight near pure noise is ~SNR, i.e. ~0: the steps where only the
    condition can tell the answer learn slowly (plain v-MSE weighs them ~1).
    """
    if gamma is None:
        return torch.ones_like(snr)
    clipped = snr.clamp(max=gamma)
    return clipped / snr if prediction == "epsilon" else clipped / (snr + 1.0)


class DdimSampler:
    """DDPM-trained on the cosine schedule; sampled with DDIM. See the module docstring."""

    name = "ddim"

    def __init__(self, train_timesteps: int, prediction: str, min_snr_gamma: float | None):
        self.train_timesteps = train_timesteps
        self.prediction = prediction
        self.min_snr_gamma = min_snr_gamma
        self.noise_scheduler = DDPMScheduler(train_timesteps, schedule="cosine", prediction_type=prediction)
        # No clipping of predicted x0 to [-1, 1]: scaled latents have unit variance, not a range.
        self.scheduler = DDIMScheduler(
            train_timesteps, schedule="cosine", clip_sample=False, prediction_type=prediction
        )

    def training_loss(
        self, model_fn: ModelFn, x0: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """Min-SNR-weighted masked MSE of the epsilon or v prediction at a random t per sample."""
        t = torch.randint(0, self.train_timesteps, (x0.shape[0],), generator=generator).to(x0.device)  # (B,)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)  # (B, C, D, H, W)
        x_t = self.noise_scheduler.add_noise(x0, noise, t)
        if self.prediction == "epsilon":
            target = noise
        else:
            target = self.noise_scheduler.get_velocity(x0, noise, t)
        prediction = model_fn(torch.cat([x_t, cond], dim=1), t)  # (B, C, D, H, W)
        alpha_bar = self.noise_scheduler.alphas_cumprod.to(x0.device)[t].double()  # (B,)
        weight = min_snr_weight(alpha_bar / (1.0 - alpha_bar), self.min_snr_gamma, self.prediction).float()
        return (weight * masked_mse(prediction, target, mask)).mean()

    def timesteps(self, steps: int) -> torch.Tensor:
        """`steps` timesteps, descending, `train_timesteps // steps` apart, the last one below that.

        MONAI 1.6.1's `DDIMScheduler.set_timesteps` spaces timesteps with linspace, but its
        `step()` moves from t to t - train_timesteps // steps: the two disagree unless the steps
        divide evenly. These "trailing" timesteps (Lin et al. 2024, table 2) move by exactly what
        `step()` assumes and end at alpha_bar = 1, so the last update returns the x0 estimate.
        """
        if not 1 <= steps <= self.train_timesteps:
            raise ValueError(f"sample_steps={steps}: use 1 to train_timesteps={self.train_timesteps}")
        stride = self.train_timesteps // steps
        return torch.arange(steps, 0, -1) * stride - 1

    @torch.no_grad()
    def sample(
        self, model_fn: ModelFn, cond: torch.Tensor, steps: int, generator: Generators,
        progress: StepProgress | None = None, channels: int | None = None,
    ) -> torch.Tensor:
        """x0 (B, channels, ...) by deterministic DDIM (eta = 0) from Gaussian noise."""
        self.scheduler.set_timesteps(steps)  # sets num_inference_steps, which step() reads
        x_t = initial_noise(_latent_shape(cond, channels), generator).to(cond.device, cond.dtype)  # (B, C, D, H, W)
        timesteps = self.timesteps(steps)
        for i, t in enumerate(timesteps):
            output = model_fn(torch.cat([x_t, cond], dim=1), t.expand(cond.shape[0]).to(cond.device))
            x_t, _ = self.scheduler.step(output.float(), int(t), x_t)
            if progress is not None:
                progress(i + 1, len(timesteps))
        return x_t


class RectifiedFlowSampler:
    """Rectified flow: x_t = (1 - t/T) x0 + (t/T) noise, velocity x0 - noise; Euler sampling."""

    name = "rflow"
    prediction = "v_prediction"

    def __init__(self, train_timesteps: int):
        self.train_timesteps = train_timesteps
        # Integer inference timesteps: step() truncates next_timestep to an int, and only integer
        # timesteps make the Euler steps add up to exactly one unit of time. Training time is
        # continuous (drawn here), which covers them.
        self.scheduler = RFlowScheduler(train_timesteps, use_discrete_timesteps=True)

    def training_loss(
        self, model_fn: ModelFn, x0: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """Masked MSE of the predicted velocity at a uniform random t per sample."""
        t = (torch.rand(x0.shape[0], generator=generator) * self.train_timesteps).to(x0.device)  # (B,) in [0, T)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)  # (B, C, D, H, W)
        x_t = self.scheduler.add_noise(x0, noise, t)
        prediction = model_fn(torch.cat([x_t, cond], dim=1), t)
        return masked_mse(prediction, x0 - noise, mask).mean()

    def timesteps(self, steps: int) -> torch.Tensor:
        """T, T (N-1)/N, ..., T/N rounded to integers, as MONAI's `set_timesteps` gives them."""
        self.scheduler.set_timesteps(steps)
        return self.scheduler.timesteps.clone()

    @torch.no_grad()
    def sample(
        self, model_fn: ModelFn, cond: torch.Tensor, steps: int, generator: Generators,
        progress: StepProgress | None = None, channels: int | None = None,
    ) -> torch.Tensor:
        """x0 (B, channels, ...) by Euler steps of the predicted velocity from t = T (noise) to 0."""
        if not 1 <= steps <= self.train_timesteps:
            raise ValueError(f"sample_steps={steps}: use 1 to train_timesteps={self.train_timesteps}")
        x_t = initial_noise(_latent_shape(cond, channels), generator).to(cond.device, cond.dtype)  # (B, C, D, H, W)
        timesteps = self.timesteps(steps)
        next_timesteps = torch.cat([timesteps[1:], timesteps.new_zeros(1)])
        for i, (t, t_next) in enumerate(zip(timesteps, next_timesteps)):
            t_batch = t.float().expand(cond.shape[0]).to(cond.device)  # (B,)
            velocity = model_fn(torch.cat([x_t, cond], dim=1), t_batch)
            x_t, _ = self.scheduler.step(velocity.float(), int(t), x_t, int(t_next))
            if progress is not None:
                progress(i + 1, len(timesteps))
        return x_t


def _latent_shape(cond: torch.Tensor, channels: int | None) -> tuple[int, ...]:
    """The shape of the latents sampled for `cond` (B, C_cond, ...): `channels` replaces C_cond."""
    return (cond.shape[0], cond.shape[1] if channels is None else channels, *cond.shape[2:])


def make_sampler(config: DiffusionConfig) -> Sampler:
    """The sampler a diffusion config names."""
    if config.sampler == "ddim":
        return DdimSampler(config.train_timesteps, config.prediction, config.min_snr_gamma)
    if config.sampler == "rflow":
        return RectifiedFlowSampler(config.train_timesteps)
    raise ValueError(f"unknown diffusion.sampler {config.sampler!r}; use ddim or rflow")
