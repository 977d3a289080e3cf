"""Random training windows from the latent cache: thin latent, its condition, and a padding mask.

A window is `window_slices` consecutive thin latent slices of a random case (the whole volume,
padded, when it is shorter), optionally cropped in-plane to `latent_patch`, with the condition
computed from the thick latents at the window's thin latent positions (ctdiff.diffusion); both
are multiplied by the store's latent scale factor. In a residual store (ctdiff.residual) the
window is of residual latents (times the scale factor) and the condition is the stored base
condition over the same latent slices, as it is (already in [-1, 1]). Padding (depth beyond
the volume, in-plane up to the network's size multiple or the patch) is zero, and the mask is 0 there so the loss never
counts it. Every random choice comes from one numpy Generator, whose state training checkpoints
save.

Cases are read whole and kept in memory up to `cache_bytes` (least recently used out first):
latents are 64x smaller than the images (a 300-slice 256 px case is ~6 MB), and a Zarr read
costs ~2 ms: reading two slabs per window took longer than the tiny network's training step.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ctdiff.diffusion import condition, latent_z
from ctdiff.latents import LatentStore
from ctdiff.residual import is_residual
from ctdiff.sliding import padded_size

DEFAULT_CACHE_BYTES = 2 << 30


@dataclass(frozen=True)
class _Case:
    thin_depth: int  # thin latent slices
    thin_z_mm: np.ndarray  # (d_thin,) latent positions
    thick_z_mm: np.ndarray  # (d_thick,) latent positions


class LatentWindowSampler:
    """Random (window, condition, mask) batches from `case_ids` of a latent store."""

    def __init__(
        self,
        store: LatentStore,
        case_ids: Sequence[str],
        window_slices: int,
        latent_patch: int | None,
        size_multiple: int,
        scale_factor: float,
        rng: np.random.Generator,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ):
        if not case_ids:
            raise ValueError(f"no cases to sample latent windows from in {store.path}; encode the train split first")
        self.store = store
        self.case_ids = list(case_ids)
        self.window_slices = window_slices
        self.latent_patch = latent_patch
        self.size_multiple = size_multiple
        self.scale_factor = float(scale_factor)
        self.rng = rng
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self.residual = is_residual(store.base)
        depth_factor = int(store.root_attrs()["factors"][0])
        self._cases: dict[str, _Case] = {}
        for case_id in self.case_ids:  # positions and shapes only: a few numbers per slice
            attrs, entry = store.case_attrs(case_id), store.entry(case_id)
            self._cases[case_id] = _Case(
                thin_depth=int(entry["thin_latent_shape"][1]),
                thin_z_mm=latent_z(np.asarray(attrs["thin"]["z_mm"]), depth_factor),
                thick_z_mm=latent_z(np.asarray(attrs["thick"]["z_mm"]), depth_factor),
            )
        first = store.entry(self.case_ids[0])
        channels, _, height, width = first["thin_latent_shape"]
        self.channels = int(channels)
        self.condition_channels = int(first["condition_shape"][0]) if self.residual else self.channels
        self.plane = (
            (latent_patch, latent_patch) if latent_patch is not None
            else (padded_size(height, size_multiple), padded_size(width, size_multiple))
        )

    def sample(self, batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """x0 (B, C, window, h, w), cond (B, C_cond, window, h, w) and mask (B, 1, window, h, w),
        float32."""
        shape = (batch_size, self.channels, self.window_slices, *self.plane)
        x0 = np.zeros(shape, np.float32)
        cond = np.zeros((batch_size, self.condition_channels, *shape[2:]), np.float32)
        mask = np.zeros((batch_size, 1, *shape[2:]), np.float32)
        cond_scale = 1.0 if self.residual else self.scale_factor
        for b in range(batch_size):
            thin, cond_b = self._window()  # (C, d, h, w), (C_cond, d, h, w); d <= window
            _, d, h, w = thin.shape
            x0[b, :, :d, :h, :w] = thin * self.scale_factor
            cond[b, :, :d, :h, :w] = cond_b * cond_scale
            mask[b, :, :d, :h, :w] = 1.0
        return x0, cond, mask

    def _window(self) -> tuple[np.ndarray, np.ndarray]:
        case_id = self.case_ids[int(self.rng.integers(len(self.case_ids)))]
        case = self._cases[case_id]
        z0 = int(self.rng.integers(max(case.thin_depth - self.window_slices, 0) + 1))
        thin_all, thick_all = self._latents(case_id)  # (C, d_thin, H, W), (C, d_thick, H, W)
        thin = thin_all[:, z0 : z0 + self.window_slices]  # (C, d, H, W)
        if self.residual:  # thick_all is the base condition on the thin latent grid
            cond = thick_all[:, z0 : z0 + self.window_slices]  # (C_cond, d, H, W)
        else:
            thin_z = case.thin_z_mm[z0 : z0 + thin.shape[1]]
            # Only the thick slices that bracket the window enter the interpolation.
            lo = max(int(np.searchsorted(case.thick_z_mm, thin_z[0], side="right")) - 1, 0)
            hi = min(int(np.searchsorted(case.thick_z_mm, thin_z[-1], side="left")), len(case.thick_z_mm) - 1)
            cond = condition(thick_all[:, lo : hi + 1], case.thick_z_mm[lo : hi + 1], thin_z)  # (C, d, H, W)
        if self.latent_patch is None:
            return thin, cond
        _, _, height, width = thin.shape
        y0 = int(self.rng.integers(max(height - self.latent_patch, 0) + 1))
        x0 = int(self.rng.integers(max(width - self.latent_patch, 0) + 1))
        crop = (slice(None), slice(None), slice(y0, y0 + self.latent_patch), slice(x0, x0 + self.latent_patch))
        return thin[crop], cond[crop]

    def _latents(self, case_id: str) -> tuple[np.ndarray, np.ndarray]:
        """A case's thin latents and their condition source (thick latents, or the base
        condition of a residual store), from the cache or the store."""
        if case_id in self._cache:
            self._cache.move_to_end(case_id)
            return self._cache[case_id]
        latents = (self.store.read(case_id, "thin"), self.store.read(case_id, "condition" if self.residual else "thick"))
        self._cache[case_id] = latents
        while len(self._cache) > 1 and sum(a.nbytes + b.nbytes for a, b in self._cache.values()) > self.cache_bytes:
            self._cache.popitem(last=False)
        return latents

    # -- resumable state ---------------------------------------------------------------------

    def rng_state(self) -> dict:
        return self.rng.bit_generator.state

    def set_rng_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state
