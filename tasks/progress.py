"""Progress of long work, shown both as a terminal bar and as a Prefect progress artifact."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from tqdm import tqdm


class Progress:
    """`with Progress(total, "cases") as p: p.advance(postfix)`; ETA comes from tqdm."""

    def __init__(self, total: int, unit: str, description: str):
        self.total = max(total, 1)
        self.done = 0
        self._bar = tqdm(total=total, unit=unit, desc=description, file=sys.stderr, dynamic_ncols=True)
        self._artifact_id = create_progress_artifact(progress=0.0, description=description)
        self._last_update = 0.0

    def advance(self, n: int = 1, **postfix: object) -> None:
        self.done += n
        self._bar.update(n)
        if postfix:
            self._bar.set_postfix(postfix, refresh=False)
        now = time.monotonic()
        # The API is rate-limited in spirit: update at most twice a second, and always at the end.
        if now - self._last_update > 0.5 or self.done >= self.total:
            update_progress_artifact(self._artifact_id, progress=100.0 * self.done / self.total)
            self._last_update = now

    def advance_to(self, done: int, **postfix: object) -> None:
        """Set the absolute count (e.g. a training step, which may start past 0 on resume)."""
        self.advance(done - self.done, **postfix)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.close()


def training_reporter(bar: Progress) -> Callable[[dict], None]:
    """The progress callback of ctdiff's training loops: step, loss and latest val PSNR on `bar`."""

    def report(info: dict) -> None:
        postfix = {"loss": f"{info['loss']:.4f}"} if info.get("loss") is not None else {}
        if info.get("val_psnr") is not None:
            postfix["val_psnr"] = f"{info['val_psnr']:.2f}"
        bar.advance_to(info["step"], **postfix)

    return report
