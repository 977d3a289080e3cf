"""The work folder's layout (SPEC §4): the one place that knows where each output lives.

    <work>/checkpoints/vae/{last,best}.pt        VAE training (ctdiff.train_vae)
    <work>/checkpoints/diffusion/{last,best}.pt  diffusion training (ctdiff.train_diffusion)
    <work>/latents/<vae digest>/                 one latent store per VAE checkpoint (ctdiff.latents)
    <work>/reports/<run>/                        one evaluation report (SPEC §6)
    <work>/reports/history.jsonl                 one line per evaluation
    <work>/previews/<case>.png                   previews of ingested cases

Tasks and flows ask a `WorkLayout` for paths instead of building them, so they never import
each other for a folder name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Model = Literal["vae", "diffusion"]


@dataclass(frozen=True)
class WorkLayout:
    """Paths under one work folder (`paths.work`)."""

    root: Path

    @classmethod
    def of(cls, config) -> "WorkLayout":
        """The layout of a `ctdiff.config.Config`'s `paths.work`."""
        return cls(Path(config.paths.work))

    def checkpoint_dir(self, model: Model) -> Path:
        return self.root / "checkpoints" / model

    def checkpoint(self, model: Model, choice: str) -> Path:
        """A `best` | `last` | PATH setting: best.pt or last.pt of `model`, or the path itself."""
        return self.checkpoint_dir(model) / f"{choice}.pt" if choice in ("best", "last") else Path(choice)

    def newest_checkpoint(self, model: Model) -> Path:
        """The most recently written `*.pt` of `model`: what a nightly re-evaluation scores."""
        folder = self.checkpoint_dir(model)
        candidates = sorted(folder.glob("*.pt"), key=lambda p: (p.stat().st_mtime_ns, p.name))
        if not candidates:
            raise ValueError(f"no {model} checkpoint in {folder}; run `ctdiff train-{model}` first")
        return candidates[-1]

    @property
    def latents(self) -> Path:
        """The folder of the latent stores, one per VAE checkpoint digest."""
        return self.root / "latents"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def history(self) -> Path:
        return self.reports / "history.jsonl"

    @property
    def previews(self) -> Path:
        return self.root / "previews"
