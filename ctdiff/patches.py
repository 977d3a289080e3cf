"""Random training patches from the case store, windowed on read.

Each patch reads only its slab (`store.read(..., z_slice=...)`), so memory stays at one patch
per read whatever the volume size. Every random choice comes from one numpy Generator, so a
sampler is deterministic given that generator's state, which training checkpoints save.

With a residual `base` (ctdiff.residual) a patch is the gained residual of a thin slab over the
base interpolated from the whole thick series (cropped in-plane to the patch first, so a cubic
spline costs one patch column): what the residual VAE has to encode. Thick patches are then
never drawn: the residual VAE never sees thick slices. The thick volumes this needs are kept in
a small LRU cache (`thick_cache_bytes`), so a case's thick series is read once, not per patch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from ctdiff.residual import Base, base_volume, is_residual, residual_target
from ctdiff.store import CaseStore
from ctdiff.volume import Kind, Volume
from ctdiff.windowing import apply_window

# The VAE must reconstruct thin slices, but thick ones are its conditioning input later, so
# the encoder sees both kinds.
THICK_PROBABILITY = 0.5
THICK_CACHE_BYTES = 1 << 30


class PatchSampler:
    """Random (patch_slices, patch_size, patch_size) crops of random cases, thin or thick.

    A volume smaller than the patch along any axis is padded with 0, the window floor (air).
    """

    def __init__(
        self,
        store: CaseStore,
        case_ids: Sequence[str],
        window: tuple[float, float],
        patch_slices: int,
        patch_size: int,
        rng: np.random.Generator,
        thick_probability: float = THICK_PROBABILITY,
        base: Base = "none",
        thick_cache_bytes: int = THICK_CACHE_BYTES,
    ):
        if not case_ids:
            raise ValueError(f"no cases to sample patches from in {store.path}; preprocess some first")
        self.store = store
        self.case_ids = list(case_ids)
        self.center_hu, self.width_hu = window
        self.patch_slices = patch_slices
        self.patch_size = patch_size
        self.rng = rng
        self.base = base
        self.thick_probability = 0.0 if is_residual(base) else thick_probability
        self.thick_cache_bytes = thick_cache_bytes
        self._thick: OrderedDict[str, Volume] = OrderedDict()
        # Depths per case and kind, from the manifest entries (a few numbers, not volumes).
        self._depth: dict[tuple[str, Kind], int] = {}
        for case_id in self.case_ids:
            entry = store.entry(case_id)
            if entry is None or entry.get("status") != "ok":
                raise ValueError(f"case {case_id!r} is not an ok case of {store.path}")
            self._depth[case_id, "thin"] = int(entry["n_thin"])
            self._depth[case_id, "thick"] = int(entry["n_thick"])

    def sample(self, batch_size: int) -> np.ndarray:
        """(B, 1, patch_slices, patch_size, patch_size) float32: windowed in [0, 1], or the gained
        residual (ctdiff.residual.residual_target) with a residual base."""
        out = np.zeros((batch_size, 1, self.patch_slices, self.patch_size, self.patch_size), np.float32)
        for b in range(batch_size):
            out[b, 0] = self._patch()
        return out

    def _patch(self) -> np.ndarray:
        case_id = self.case_ids[int(self.rng.integers(len(self.case_ids)))]
        kind: Kind = "thick" if self.rng.random() < self.thick_probability else "thin"
        depth = self._depth[case_id, kind]
        z0 = int(self.rng.integers(max(depth - self.patch_slices, 0) + 1))
        slab = self.store.read(case_id, kind, z_slice=slice(z0, z0 + self.patch_slices))
        _, height, width = slab.shape
        y0 = int(self.rng.integers(max(height - self.patch_size, 0) + 1))
        x0 = int(self.rng.integers(max(width - self.patch_size, 0) + 1))
        plane = (slice(None), slice(y0, y0 + self.patch_size), slice(x0, x0 + self.patch_size))
        values = apply_window(slab.hu[plane], self.center_hu, self.width_hu)  # (d, h, w)
        if is_residual(self.base):
            thick = self._thick_volume(case_id)
            base = base_volume(apply_window(thick.hu[plane], self.center_hu, self.width_hu), thick.z_mm, slab.z_mm, self.base)
            values = residual_target(values, base)  # (d, h, w)
        patch = np.zeros((self.patch_slices, self.patch_size, self.patch_size), np.float32)
        d, h, w = values.shape
        patch[:d, :h, :w] = values
        return patch  # (patch_slices, patch_size, patch_size)

    def _thick_volume(self, case_id: str) -> Volume:
        """A case's whole thick volume, from the LRU cache or the store."""
        if case_id in self._thick:
            self._thick.move_to_end(case_id)
            return self._thick[case_id]
        volume = self._thick[case_id] = self.store.read(case_id, "thick")
        while len(self._thick) > 1 and sum(v.hu.nbytes for v in self._thick.values()) > self.thick_cache_bytes:
            self._thick.popitem(last=False)
        return volume

    # -- resumable state ---------------------------------------------------------------------

    def rng_state(self) -> dict:
        return self.rng.bit_generator.state

    def set_rng_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state
