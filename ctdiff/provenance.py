"""What a diffusion checkpoint was trained with and on, and the checks that follow from it.

A checkpoint is only scored on cases it never trained on, in the window it was trained in, on a
store whose cases have the in-plane size of those it trained on; `ctdiff infer` resizes its
input to that size. The training cases are those of the diffusion model and of its VAE
(the `data` record every checkpoint carries); checkpoints from before that record have unknown
training cases, which the report says.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ctdiff.errors import UsageError
from ctdiff.volume import Volume


@dataclass(frozen=True)
class Provenance:
    """The preprocessing and the cases of one diffusion checkpoint (and its VAE)."""

    path: str
    window: tuple[float, float]  # (center_hu, width_hu) of its config
    inplane_px: tuple[int, int] | None  # (H, W) of its training cases (`trained_inplane_px`)
    base: str  # diffusion.base
    vae_digest: str | None  # the VAE's weights (ctdiff.checkpoint.checkpoint_digest)
    train_ids: frozenset[str] | None  # diffusion and VAE training cases; None: not recorded
    val_ids: frozenset[str] | None

    @classmethod
    def read(cls, path: str | Path) -> "Provenance":
        """The provenance of the diffusion checkpoint at `path` (weights stay on disk)."""
        path = Path(path)
        payload = _metadata(path)
        if payload.get("kind") != "diffusion":
            raise UsageError(f"{path} is not a ctdiff diffusion checkpoint (kind={payload.get('kind')!r})")
        preprocess = payload["config"]["preprocess"]
        vae = _vae_metadata(path, payload.get("vae", {}))
        records = [payload.get("data"), vae.get("data") if vae else None]
        known = all(r is not None for r in records)
        return cls(
            path=str(path),
            window=(float(preprocess["window"]["center_hu"]), float(preprocess["window"]["width_hu"])),
            inplane_px=trained_inplane_px(payload),
            base=(payload.get("formulation") or {"base": "none"})["base"],
            vae_digest=payload.get("vae", {}).get("digest"),
            train_ids=frozenset().union(*(r["train_ids"] for r in records)) if known else None,
            val_ids=frozenset().union(*(r["val_ids"] for r in records)) if known else None,
        )

    def check_unseen(self, case_ids: list[str]) -> None:
        """UsageError naming the cases of `case_ids` this checkpoint (or its VAE) trained on."""
        seen = sorted(set(case_ids) & (self.train_ids or frozenset()))
        if seen:
            shown = ", ".join(seen[:5]) + (f" and {len(seen) - 5} more" if len(seen) > 5 else "")
            raise UsageError(
                f"{self.path} was trained on {len(seen)} of the {len(case_ids)} cases to score ({shown}); "
                "score cases it never saw (evaluate.split=test, or evaluate.cases=[...])"
            )

    def check_case(self, case_id: str, volume: Volume) -> None:
        """UsageError when a stored case is not of the in-plane size this model trained on."""
        if self.inplane_px is not None and tuple(volume.shape[1:]) != self.inplane_px:
            height, width = self.inplane_px
            raise UsageError(
                f"case {case_id} is stored at {volume.shape[2]}x{volume.shape[1]} px, but {self.path} was "
                f"trained on {width}x{height} px cases; preprocess a store at preprocess.resolution={width}"
            )


def trained_inplane_px(payload: dict[str, Any]) -> tuple[int, int] | None:
    """(H, W) of the cases a diffusion checkpoint trained on: recorded with its cases, else (for
    a checkpoint from before that record) its config's `preprocess.resolution`; None if unknown."""
    recorded = (payload.get("data") or {}).get("inplane_px")
    if recorded is not None:
        return int(recorded[0]), int(recorded[1])
    resolution = payload["config"]["preprocess"].get("resolution")
    return None if resolution is None else (int(resolution), int(resolution))


def common_window(provenances: list[Provenance]) -> tuple[float, float]:
    """The one window all checkpoints were trained in: what every method is scored in."""
    windows = {p.window for p in provenances}
    if len(windows) > 1:
        listed = "; ".join(f"{p.path}: {p.window[0]:g}/{p.window[1]:g} HU" for p in provenances)
        raise UsageError(f"the checkpoints were trained in different windows ({listed}); evaluate them apart")
    return windows.pop()


def _metadata(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UsageError(f"no such checkpoint: {path}")
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _vae_metadata(path: Path, vae: dict) -> dict[str, Any] | None:
    """The VAE checkpoint a diffusion checkpoint records, found as `ThinSliceModel.load` finds
    it (its path, else relative to the diffusion checkpoint); None when it is missing."""
    candidates = [Path(vae["path"]), path.parent / vae.get("relative_path", vae["path"])] if vae else []
    found = next((p for p in candidates if p.is_file()), None)
    return None if found is None else _metadata(found)
