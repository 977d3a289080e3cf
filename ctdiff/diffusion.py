"""The conditional latent diffusion network and its condition: thick latents upsampled along z.

The network is MONAI's `DiffusionModelUNet` (Rombach et al. 2022; Pinaya et al. 2022) in 3D. Its
input is the noisy thin latent concatenated with the condition along channels (the "concat"
conditioning of SR3, Saharia et al. 2021), so it has 2 x C inputs and C outputs for C latent
channels. The condition is the thick latent linearly interpolated along z onto the thin latent
slices: the in-plane grids of the two series are identical, so this is the trilinear upsampling
of the thick latent onto the thin latent grid, and slice positions (not a fixed ratio) decide it,
so any thick/thin pair works.

MONAI's UNet halves D, H and W alike at each level but the last (a stride-2 3D convolution, then
nearest upsampling back), so every input axis must be a multiple of `UNetPreset.size_multiple`.
Training windows and inference volumes are padded to it, with a mask (ctdiff.latent_windows,
ctdiff.sliding). Pooling in-plane only would let depth windows be shorter, but MONAI's network
has no such option and the windows (window_slices latent slices) are long enough.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from monai.networks.nets import DiffusionModelUNet

from ctdiff.interpolate import interpolate_z


@dataclass(frozen=True)
class UNetPreset:
    channels: tuple[int, ...]  # feature channels per level; len - 1 halvings of every axis
    num_res_blocks: tuple[int, ...]
    attention_levels: tuple[bool, ...]  # the mid block always has self-attention in MONAI's UNet
    norm_num_groups: int
    num_head_channels: int

    @property
    def size_multiple(self) -> int:
        """What every input axis (latent depth, height, width) must be a multiple of."""
        return 2 ** (len(self.channels) - 1)


PRESETS: dict[str, UNetPreset] = {
    # GPU-sized (165M parameters): attention only at the lowest level, where a 32-slice window
    # of 32 x 32 latents (256 px images) is 8 x 8 x 8 = 512 tokens.
    "full": UNetPreset((128, 256, 512), (2, 2, 2), (False, False, True), 32, 64),
    # CPU tests (0.44M parameters); its mid block still attends.
    "tiny": UNetPreset((16, 32), (1, 1), (False, False), 8, 16),
    # The CPU demo and quality benchmark: tiny with twice the channels.
    "small": UNetPreset((32, 64), (1, 1), (False, False), 8, 16),
}


def get_preset(name: str) -> UNetPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown diffusion preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def build_unet(preset_name: str, latent_channels: int, condition_channels: int | None = None) -> DiffusionModelUNet:
    """The preset's 3D UNet: (B, C + C_cond, D, H, W) noisy latent + condition and (B,) timesteps
    -> (B, C, D, H, W). C_cond defaults to C (thick latents); the residual formulation's base
    condition has one channel per pixel of a latent block (ctdiff.residual)."""
    preset = get_preset(preset_name)
    return DiffusionModelUNet(
        spatial_dims=3,
        in_channels=latent_channels + (latent_channels if condition_channels is None else condition_channels),
        out_channels=latent_channels,
        channels=preset.channels,
        num_res_blocks=preset.num_res_blocks,
        attention_levels=preset.attention_levels,
        norm_num_groups=preset.norm_num_groups,
        num_head_channels=preset.num_head_channels,
        use_flash_attention=True,  # torch's fused attention: same weights, less memory (works on CPU too)
    )


def latent_z(z_mm: np.ndarray, depth_factor: int) -> np.ndarray:
    """Positions (mm) of the latent slices of a volume whose image slices sit at `z_mm` (ascending).

    Latent slice j stands for image slices j*f .. j*f+f-1 and sits at the mean of their positions.
    The last latent slice may reach past the volume: `ctdiff.latents.encode_volume` pads with
    copies of the last slice, so a padded slice is placed where the slice it copies is (its content
    is there; an extrapolated position would place it past the data).
    """
    z = np.asarray(z_mm, dtype=np.float64)
    if z.ndim != 1 or z.size == 0:
        raise ValueError(f"expected a non-empty 1D array of slice positions, got shape {z.shape}")
    if depth_factor < 1:
        raise ValueError(f"depth_factor={depth_factor}: must be at least 1")
    padded = np.pad(z, (0, -z.size % depth_factor), mode="edge")  # as encode_volume pads the image
    return padded.reshape(-1, depth_factor).mean(axis=1)


def condition(thick_latent: np.ndarray, thick_latent_z_mm: np.ndarray, thin_latent_z_mm: np.ndarray) -> np.ndarray:
    """The thick latent (C, d_thick, h, w) linearly interpolated at `thin_latent_z_mm` -> (C, d_thin, h, w).

    Positions past either end take the end slice (clamped, never extrapolated), as the image
    baselines in ctdiff.interpolate do. float32.
    """
    if thick_latent.ndim != 4:
        raise ValueError(f"expected a (C, d, h, w) latent, got shape {thick_latent.shape}")
    channels, depth, height, width = thick_latent.shape
    stacked = np.moveaxis(thick_latent, 0, 1).reshape(depth, channels * height, width)  # (d_thick, C*h, w)
    out = interpolate_z(stacked, thick_latent_z_mm, thin_latent_z_mm, "linear")  # (d_thin, C*h, w)
    return np.ascontiguousarray(np.moveaxis(out.reshape(-1, channels, height, width), 1, 0))  # (C, d_thin, h, w)
