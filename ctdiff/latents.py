"""The latent cache: thick and thin cases encoded by a VAE checkpoint, in one Zarr v3 group.

Layout (one store per VAE checkpoint, beside the case store)::

    <work>/latents/<vae_digest>/zarr.json      root; attrs: format, vae_digest, preset, factors,
                                               window, scale_factor
    <work>/latents/<vae_digest>/cases/<id>/    float32 arrays (C, d, h, w) and the case attrs
                                               (key, window, base, per kind: shape, padding,
                                               z_mm, spacing_mm)

The arrays follow the VAE's formulation (ctdiff.residual; root attr `base`): with `none`,
`thin` and `thick` are the latents of the windowed volumes; with a residual base, `thin` is the
latent of the gained residual of the thin volume over the base, and `condition` the base
folded onto the thin latent grid (`base_condition`), so training reads its condition as it
reads latents. The scale factor is then that of the residual latents.
    <work>/latents/<vae_digest>/.staging/      cases being written; renamed into place when done

Precision: the VAE always encodes and decodes in float32 (`_fp32` switches off any autocast
of the caller), so the latents the diffusion model trained on (the cache) and those it is given
at validation, evaluation and inference come from one computation, on any device. Only the
diffusion UNet runs under `train_diffusion.precision` (bf16 autocast on CUDA by default).

Latents are the posterior mean, never a sample (MONAI's `encode_stage_2_inputs` samples), so the
cache is deterministic and the diffusion model sees the same latents every epoch. Volumes are
padded at the far end of each axis (edge values) to multiples of the VAE's factors; the padding is
recorded so `decode_latents` crops back to the image shape.

Depth chunks bound memory. Slice presets (factors (1, f, f)) encode slices independently, so
chunking is exact. The 3D maisi presets see across chunk borders: each chunk is encoded with a
halo of `halo_slices` image slices on each side and only its centre latents are kept. Two
effects remain and make chunked latents differ slightly from whole-volume ones near borders:
the convolutional receptive field is wider than the halo (24 image slices on maisi-tiny), and
GroupNorm statistics are taken over the chunk rather than the whole volume (as in MAISI's own
sliding-window inference, and as in VAE training on patches). Measured on maisi-tiny, 48-64
slice phantoms, 16-slice chunks, halo 16: mean |error| 1.5% of the latent std, largest 18% (briefly
trained) or 23% (random weights), at chunk borders. The error shrinks as chunks and halo grow.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
import uuid
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal, Protocol

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from ctdiff import interpolate, residual, windowing
from ctdiff.atomic import replace_dir
from ctdiff.fingerprint import code_version, settings_digest
from ctdiff.residual import Base, base_condition, base_volume, is_residual, residual_target
from ctdiff.volume import KINDS, Kind, Volume

if TYPE_CHECKING:  # MONAI's import (seconds) only where a network is built, not for cache keys
    from ctdiff.autoencoder import CtAutoencoder

LATENT_FORMAT = 1
# maisi presets: image slices of context on each side of a depth chunk. 16 rather than 8: on a
# briefly trained maisi-tiny it cuts the largest border error from 0.29 to 0.18 latent std for
# 1.5x rather than 1.25x the compute of 64-slice chunks.
DEFAULT_HALO_SLICES = 16
_CHUNK_LATENT_SLICES = 8  # Zarr chunk depth: diffusion training reads short depth windows


# -- arrays -> arrays --------------------------------------------------------------------------


def padding_for(shape: tuple[int, ...], factors: tuple[int, int, int]) -> tuple[int, int, int]:
    """Slices to add at the far end of (D, H, W) to reach multiples of the factors."""
    return tuple(-n % f for n, f in zip(shape, factors))  # type: ignore[return-value]


def _depth_chunks(n_latent: int, chunk_latent: int, halo_latent: int) -> Iterator[tuple[int, int, int, int]]:
    """(keep_start, keep_stop, read_start, read_stop) in latent slices, covering [0, n_latent)."""
    for start in range(0, n_latent, chunk_latent):
        stop = min(start + chunk_latent, n_latent)
        yield start, stop, max(start - halo_latent, 0), min(stop + halo_latent, n_latent)


def _halo(model: CtAutoencoder, halo_slices: int | None) -> int:
    depth_factor = model.factors[0]
    if halo_slices is None:
        halo_slices = 0 if depth_factor == 1 else DEFAULT_HALO_SLICES
    if halo_slices < 0 or halo_slices % depth_factor:
        raise ValueError(f"halo_slices={halo_slices}: use a non-negative multiple of {depth_factor}")
    return halo_slices // depth_factor


def _check_chunk(chunk_slices: int) -> None:
    if chunk_slices < 1:
        raise ValueError(f"chunk_slices={chunk_slices}: encode at least one slice at a time")


def encode_volume(
    model: CtAutoencoder,
    x: np.ndarray,
    chunk_slices: int,
    device: str | torch.device = "cpu",
    halo_slices: int | None = None,
) -> np.ndarray:
    """Posterior mean (C, d, h, w) float32 of a windowed volume x (D, H, W) in [0, 1].

    `model` must already be on `device`. x is edge-padded to multiples of `model.factors` and
    encoded `chunk_slices` image slices at a time (rounded down to the depth factor, at least
    one latent slice); `halo_slices` defaults to 0 for slice presets, DEFAULT_HALO_SLICES else.
    """
    if x.ndim != 3:
        raise ValueError(f"expected a (D, H, W) volume, got shape {x.shape}")
    _check_chunk(chunk_slices)
    fz = model.factors[0]
    halo = _halo(model, halo_slices)
    pad = [(0, p) for p in padding_for(x.shape, model.factors)]
    padded = np.pad(x.astype(np.float32, copy=False), pad, mode="edge")  # (D+pd, H+ph, W+pw)
    n_latent = padded.shape[0] // fz
    chunk_latent = max(chunk_slices // fz, 1)
    out: np.ndarray | None = None
    with _eval_mode(model), torch.inference_mode(), _fp32(device):
        for keep_start, keep_stop, read_start, read_stop in _depth_chunks(n_latent, chunk_latent, halo):
            slab = torch.from_numpy(padded[read_start * fz : read_stop * fz]).to(device)  # (D', H, W)
            mu, _ = model.encode(slab[None, None])  # (1, C, d', h, w)
            mu = mu[0, :, keep_start - read_start : keep_stop - read_start].float().cpu().numpy()
            if out is None:
                out = np.empty((mu.shape[0], n_latent, *mu.shape[2:]), dtype=np.float32)
            out[:, keep_start:keep_stop] = mu
    assert out is not None
    return out


def decode_latents(
    model: CtAutoencoder,
    z: np.ndarray,
    out_shape: tuple[int, int, int],
    chunk_slices: int,
    device: str | torch.device = "cpu",
    halo_slices: int | None = None,
) -> np.ndarray:
    """Image (D, H, W) float32 of latents z (C, d, h, w), cropped to `out_shape`.

    The inverse of `encode_volume`, chunked the same way (chunk and halo in image slices).
    Values are the decoder's, not clipped to [0, 1].
    """
    factors = model.factors
    expected = tuple(math.ceil(n / f) for n, f in zip(out_shape, factors))
    if z.ndim != 4 or tuple(z.shape[1:]) != expected:
        raise ValueError(f"latents {z.shape} do not fit an image of {tuple(out_shape)} with factors {factors}")
    _check_chunk(chunk_slices)
    z = z.astype(np.float32, copy=False)
    fz = factors[0]
    halo = _halo(model, halo_slices)
    chunk_latent = max(chunk_slices // fz, 1)
    depth, height, width = out_shape
    out = np.empty((z.shape[1] * fz, height, width), dtype=np.float32)
    with _eval_mode(model), torch.inference_mode(), _fp32(device):
        for keep_start, keep_stop, read_start, read_stop in _depth_chunks(z.shape[1], chunk_latent, halo):
            slab = torch.from_numpy(np.ascontiguousarray(z[:, read_start:read_stop])).to(device)  # (C, d', h, w)
            image = model.decode(slab[None])[0, 0]  # (D', H', W')
            keep = slice((keep_start - read_start) * fz, (keep_stop - read_start) * fz)
            out[keep_start * fz : keep_stop * fz] = image[keep, :height, :width].float().cpu().numpy()
    return out[:depth]


def _fp32(device: str | torch.device) -> torch.autocast:
    """The precision rule of the VAE: encode and decode in float32 whatever autocast a caller has
    on, so the latent cache, validation, evaluation and inference see the same latents."""
    return torch.autocast(torch.device(device).type, enabled=False)


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode for the duration of a block (a VAE evaluated mid-training goes back to train)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# -- the store ---------------------------------------------------------------------------------


class LatentStore:
    """Latents of one VAE checkpoint; see the module docstring for the layout."""

    def __init__(self, root: str | Path, vae_digest: str):
        self.path = Path(root) / vae_digest
        self.vae_digest = vae_digest

    def exists(self) -> bool:
        return (self.path / "zarr.json").is_file()

    def create(self, preset: str, factors: tuple[int, int, int], window: tuple[float, float], base: Base = "none") -> None:
        """Create or update the root and clear staging left by killed writers.

        Call once before per-case writers start. A new window or base invalidates the scale factor;
        a store already holding these settings is only read (a cached rerun rewrites nothing).
        """
        window = [float(v) for v in window]
        attrs = {"format": LATENT_FORMAT, "vae_digest": self.vae_digest, "preset": preset,
                 "factors": [int(f) for f in factors], "window": window, "base": base}
        current = self.root_attrs()  # read-only: a fully cached rerun leaves zarr.json untouched
        if any(current.get(k) != v for k, v in attrs.items()):
            root = zarr.open_group(self.path, mode="a", zarr_format=3)
            same = root.attrs.get("window") == window and root.attrs.get("base", "none") == base
            root.attrs.update({
                **attrs,
                "scale_factor": root.attrs.get("scale_factor") if same else None,
                "scale_factor_key": root.attrs.get("scale_factor_key") if same else None,
            })
        shutil.rmtree(self.path / ".staging", ignore_errors=True)

    def root_attrs(self) -> dict[str, Any]:
        return dict(zarr.open_group(self.path, mode="r").attrs) if self.exists() else {}

    @property
    def base(self) -> Base:
        """The formulation of these latents (stores from before it: none)."""
        return self.root_attrs().get("base", "none")

    @property
    def scale_factor(self) -> float | None:
        return self.root_attrs().get("scale_factor")

    def set_scale_factor(self, value: float, key: str | None = None) -> None:
        """Record the scale factor and, optionally, the key of the latents it was computed from."""
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"latent scale factor must be a positive number, got {value}")
        zarr.open_group(self.path, mode="r+").attrs.update({"scale_factor": float(value), "scale_factor_key": key})

    def scale_factor_key(self, case_ids: list[str]) -> str:
        """What the scale factor of `case_ids` depends on: the latents of each (their keys)."""
        return settings_digest("scale-factor", self.vae_digest, {case_id: self.case_key(case_id) for case_id in case_ids})

    def ids(self) -> list[str]:
        return sorted(p.parent.name for p in (self.path / "cases").glob("*/zarr.json"))

    def case_attrs(self, case_id: str) -> dict[str, Any]:
        group = self._open(case_id)
        return {} if group is None else dict(group.attrs)

    def case_key(self, case_id: str) -> str | None:
        return self.case_attrs(case_id).get("key")

    def manifest(self) -> list[dict[str, Any]]:
        """One small entry per case, sorted by id; see `entry`."""
        return [self.entry(case_id) for case_id in self.ids()]

    def entry(self, case_id: str) -> dict[str, Any]:
        """id, key, each kind's image shape (D, H, W), and the shape (C, d, h, w) of each array
        the case holds (`<name>_latent_shape` for thin and thick, `condition_shape`)."""
        group = self._open(case_id)
        if group is None:
            raise KeyError(f"case {case_id!r} has no latents in {self.path}")
        entry: dict[str, Any] = {"id": case_id, "key": group.attrs.get("key")}
        for kind in KINDS:
            entry[f"{kind}_shape"] = group.attrs.get(kind, {}).get("shape")
            entry[f"{kind}_latent_shape"] = list(group[kind].shape) if kind in group else None
        entry["condition_shape"] = list(group["condition"].shape) if "condition" in group else None
        return entry

    def read(self, case_id: str, kind: Kind | Literal["condition"], d_slice: slice = slice(None)) -> np.ndarray:
        """An array (C, d, h, w) float32 of a case (thin, thick or condition), optionally a slab of
        latent depth."""
        group = self._open(case_id)
        if group is None:
            raise KeyError(f"case {case_id!r} has no latents in {self.path}")
        return np.asarray(group[kind][:, d_slice], dtype=np.float32)

    def write_case(self, case_id: str, arrays: dict[str, np.ndarray], attrs: dict) -> None:
        """Write a case's arrays ({name: (C, d, h, w)}) and attrs (with its `key`) in staging,
        then rename."""
        assert "key" in attrs and self.exists(), "create() the store and give the case a key"
        staging = self.path / ".staging" / f"{case_id}-{uuid.uuid4().hex[:8]}"
        group = zarr.open_group(staging, mode="w", zarr_format=3)
        for kind, latent in arrays.items():
            channels, depth, height, width = latent.shape
            array = group.create_array(
                kind,
                shape=latent.shape,
                chunks=(channels, min(_CHUNK_LATENT_SLICES, depth), height, width),
                dtype="float32",
                compressors=BloscCodec(cname="zstd", clevel=1, shuffle=BloscShuffle.shuffle),
                fill_value=0.0,
            )
            array[:] = latent
        group.attrs.update(attrs)  # last: staging content is complete from here on
        replace_dir(staging, self.path / "cases" / case_id)

    def _open(self, case_id: str) -> zarr.Group | None:
        path = self.path / "cases" / case_id
        return zarr.open_group(path, mode="r") if (path / "zarr.json").is_file() else None


# -- case steps --------------------------------------------------------------------------------


class CaseSource(Protocol):
    """Where cases are read from (`ctdiff.store.CaseStore`): this module does not import it."""

    def read(self, case_id: str, kind: Kind) -> Volume: ...


def latent_key(
    case_store_key: str, vae_digest: str, window: tuple[float, float], chunk_slices: int, base: Base = "none"
) -> str:
    """Key of a case's latents: its case-store entry, the VAE weights, window, chunking, base
    and code."""
    window = [float(v) for v in window]
    return settings_digest("latents", case_store_key, vae_digest, window, chunk_slices, base, _code_version())


@lru_cache(maxsize=1)
def _code_version() -> str:
    return code_version("ctdiff.autoencoder", windowing, interpolate, residual, sys.modules[__name__])


def encode_case(
    case_store: CaseSource,
    case_id: str,
    model: CtAutoencoder,
    latent_store: LatentStore,
    window: tuple[float, float],
    chunk_slices: int,
    device: str | torch.device,
    key: str,
    base: Base = "none",
) -> dict[str, Any]:
    """Encode a case's thick and thin volumes into `latent_store`, unless `key` is there already.

    `base` is the VAE's formulation (see the module docstring for what is stored).

    Creates the store root if missing; callers should `create()` it once first (it also takes a
    new window). Returns the case's `LatentStore.entry` with `cached` and `seconds`.
    """
    start = time.perf_counter()
    if latent_store.case_key(case_id) == key:
        return {**latent_store.entry(case_id), "cached": True, "seconds": 0.0}
    center_hu, width_hu = (float(v) for v in window)
    if not latent_store.exists():
        latent_store.create(model.preset_name, model.factors, (center_hu, width_hu), base)
    elif (latent_store.root_attrs()["window"], latent_store.base) != ([center_hu, width_hu], base):
        raise ValueError(
            f"latent store {latent_store.path} holds window {latent_store.root_attrs()['window']} and base "
            f"{latent_store.base!r}: call LatentStore.create() with the new ones before encoding"
        )
    arrays: dict[str, np.ndarray] = {}
    attrs: dict[str, Any] = {"key": key, "window": [center_hu, width_hu], "chunk_slices": chunk_slices, "base": base}
    volumes = {kind: case_store.read(case_id, kind) for kind in KINDS}
    windowed = {kind: volume.window(center_hu, width_hu) for kind, volume in volumes.items()}
    if is_residual(base):
        thin, thick = volumes["thin"], volumes["thick"]
        base_thin = base_volume(windowed["thick"], thick.z_mm, thin.z_mm, base)  # (N, H, W)
        arrays["thin"] = encode_volume(model, residual_target(windowed["thin"], base_thin), chunk_slices, device)
        arrays["condition"] = base_condition(base_thin, model.factors)  # (f*f*fz, d, h, w)
    else:
        for kind in KINDS:
            arrays[kind] = encode_volume(model, windowed[kind], chunk_slices, device)
    for kind, volume in volumes.items():
        attrs[kind] = {
            "shape": list(volume.shape),
            "padding": list(padding_for(volume.shape, model.factors)),
            "z_mm": [float(z) for z in volume.z_mm],
            "spacing_mm": [float(s) for s in volume.spacing_mm],
        }
    attrs["seconds"] = round(time.perf_counter() - start, 3)
    latent_store.write_case(case_id, arrays, attrs)
    return {**latent_store.entry(case_id), "cached": False, "seconds": time.perf_counter() - start}


def compute_scale_factor(latent_store: LatentStore, case_ids: list[str]) -> float:
    """1 / std of the thin latents of `case_ids` (train cases): brings latents to unit variance.

    As in latent diffusion (Rombach et al. 2022, §4.3.2 and appendix G), one scalar for all
    channels. Accumulated in float64 case by case, so no case set has to fit in memory.
    """
    if not case_ids:
        raise ValueError("no cases to compute the latent scale factor from; encode the train split first")
    count, total, total_sq = 0, 0.0, 0.0
    for case_id in case_ids:
        z = latent_store.read(case_id, "thin").astype(np.float64)
        count, total, total_sq = count + z.size, total + z.sum(), total_sq + np.square(z).sum()
    mean = total / count
    std = math.sqrt(max(total_sq / count - mean * mean, 0.0))
    if std == 0.0:
        raise ValueError("thin latents have zero variance; is the VAE trained?")
    return 1.0 / std
