"""Autoencoders for CT volumes: named presets over MONAI networks, one interface.

Two kinds:
- `maisi-*`: MONAI's `AutoencoderKlMaisi`, a 3D KL autoencoder; `maisi-ct` has NVIDIA's released
  MAISI settings, so the published checkpoint loads into it key for key (4x per axis).
- `slice-*`: MONAI's `AutoencoderKL` with `spatial_dims=2`, run slice by slice: 8x in-plane
  (4x for `slice-kl-4x*`) and no compression along z, because 5 mm input slices must not be
  squeezed further.

Both take windowed CT in [0, 1] shaped (B, 1, D, H, W) and give latents (B, C, d, h, w).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class AutoencoderPreset:
    kind: str  # "maisi" (3D) or "slice" (2D per slice)
    channels: tuple[int, ...]  # feature channels per level; len - 1 downsamplings
    num_res_blocks: tuple[int, ...]
    latent_channels: int
    norm_num_groups: int

    @property
    def factors(self) -> tuple[int, int, int]:
        """Downsampling (dz, dy, dx) from image to latent grid."""
        f = 2 ** (len(self.channels) - 1)
        return (f, f, f) if self.kind == "maisi" else (1, f, f)


PRESETS: dict[str, AutoencoderPreset] = {
    # NVIDIA MAISI's released VAE: 130 state-dict tensors, 20,944,897 parameters.
    "maisi-ct": AutoencoderPreset("maisi", (64, 128, 256), (2, 2, 2), 4, 32),
    "maisi-tiny": AutoencoderPreset("maisi", (8, 16, 16), (1, 1, 1), 4, 4),
    "slice-kl": AutoencoderPreset("slice", (64, 128, 256, 256), (2, 2, 2, 2), 4, 32),
    "slice-kl-tiny": AutoencoderPreset("slice", (8, 16, 16, 16), (1, 1, 1, 1), 4, 4),
    # Less in-plane compression, for residuals (ctdiff.residual), whose fine detail an 8x latent
    # grid blurs away (measured in benchmarks/RESULTS.md). 4x: 4 channels on a 4x coarser grid,
    # 4x fewer numbers than pixels; 2x: as many numbers as pixels, a learned (not a compressed)
    # representation, for small images such as the demo's.
    "slice-kl-4x": AutoencoderPreset("slice", (64, 128, 256), (2, 2, 2), 4, 32),
    "slice-kl-4x-tiny": AutoencoderPreset("slice", (8, 16, 16), (1, 1, 1), 4, 4),
    "slice-kl-2x-tiny": AutoencoderPreset("slice", (8, 16), (1, 1), 4, 4),
}


def build_network(preset: AutoencoderPreset, num_splits: int = 1, checkpointing: bool = False) -> nn.Module:
    """The MONAI network of a preset (no attention: CT volumes are large and the MAISI VAE has none)."""
    # MONAI's import (~3 s) only where a network is built: the presets alone are read without it.
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi
    from monai.networks.nets import AutoencoderKL

    if preset.kind == "maisi":
        return AutoencoderKlMaisi(
            spatial_dims=3,
            in_channels=1,
            out_channels=1,
            latent_channels=preset.latent_channels,
            num_channels=list(preset.channels),
            num_res_blocks=list(preset.num_res_blocks),
            norm_num_groups=preset.norm_num_groups,
            norm_eps=1e-6,
            attention_levels=[False] * len(preset.channels),
            with_encoder_nonlocal_attn=False,
            with_decoder_nonlocal_attn=False,
            use_checkpointing=checkpointing,
            use_convtranspose=False,
            norm_float16=False,  # True fails on the CPU (Half input vs float bias)
            num_splits=num_splits,  # splits convolutions along one axis to bound memory
            dim_split=1,
        )
    return AutoencoderKL(
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
        channels=preset.channels,
        num_res_blocks=preset.num_res_blocks,
        attention_levels=(False,) * len(preset.channels),
        latent_channels=preset.latent_channels,
        norm_num_groups=preset.norm_num_groups,
        norm_eps=1e-6,
        with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False,
        use_checkpoint=checkpointing,
    )


class CtAutoencoder(nn.Module):
    """A preset's network behind one 3D interface: (B, 1, D, H, W) in, (B, C, d, h, w) latents."""

    def __init__(self, preset_name: str, num_splits: int = 1, checkpointing: bool = False):
        super().__init__()
        if preset_name not in PRESETS:
            raise ValueError(f"unknown autoencoder preset {preset_name!r}; choose one of {', '.join(PRESETS)}")
        self.preset_name = preset_name
        self.preset = PRESETS[preset_name]
        self.net = build_network(self.preset, num_splits=num_splits, checkpointing=checkpointing)

    @property
    def factors(self) -> tuple[int, int, int]:
        return self.preset.factors

    def describe(self) -> dict:
        return {"preset": self.preset_name, **asdict(self.preset)}

    def _to_slices(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        b, c, d, h, w = x.shape
        return x.permute(0, 2, 1, 3, 4).reshape(b * d, c, h, w), d  # (B*D, C, H, W)

    @staticmethod
    def _from_slices(x: torch.Tensor, depth: int) -> torch.Tensor:
        bd, c, h, w = x.shape
        return x.reshape(bd // depth, depth, c, h, w).permute(0, 2, 1, 3, 4)  # (B, C, D, H, W)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and standard deviation, each (B, C, d, h, w)."""
        if self.preset.kind == "maisi":
            return self.net.encode(x)
        slices, depth = self._to_slices(x)
        mu, sigma = self.net.encode(slices)
        return self._from_slices(mu, depth), self._from_slices(sigma, depth)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.preset.kind == "maisi":
            return self.net.decode(z)
        slices, depth = self._to_slices(z)
        return self._from_slices(self.net.decode(slices), depth)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruction from a posterior sample, with the posterior (mu, sigma) for the KL term."""
        mu, sigma = self.encode(x)
        z = mu + sigma * torch.randn_like(sigma)
        return self.decode(z), mu, sigma


def kl_loss(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)), summed over latent elements, averaged over the batch."""
    kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2) + 1e-12) - 1.0)
    return kl.flatten(1).sum(1).mean()
