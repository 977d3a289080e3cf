"""Progress of long work, shown both as a terminal bar and as a Prefect progress artifact."""

from __future__ import annotations

import logging
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
        # The label first: update() redraws the bar, which then names the case just finished
        # (set after it, without a refresh, the label showed the case before).
        if postfix:
            self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(n)
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


def write_logs_around_bars(handler: logging.Handler) -> None:
    """Make a stream `handler` (Prefect's console handler) clear the progress bars drawn on its
    stream before each record and redraw them after, so that a log line never lands on a bar's
    line. Idempotent; a handler without a stream is left alone."""
    stream = getattr(handler, "stream", None)
    if stream is None or getattr(handler, "_ctdiff_bar_aware", False):
        return
    emit = handler.emit

    def emit_between_bars(record: logging.LogRecord) -> None:
        if not getattr(tqdm, "_instances", None):  # no bar open: nothing to clear
            emit(record)
            return
        with tqdm.external_write_mode(file=handler.stream):
            emit(record)

    handler.emit = emit_between_bars  # type: ignore[method-assign]
    handler._ctdiff_bar_aware = True  # type: ignore[attr-defined]


CLEAR_LINE = "\r\x1b[2K"  # carriage return, then erase the whole line (ANSI EL 2)


def clear_line_before_logs(handler: logging.Handler) -> None:
    """For a process that shares a terminal with another process's progress bars (a Dask worker
    beside the CLI): make a stream `handler` erase the terminal line before each record, so its
    log line never continues a bar's line (the bar redraws below it on its next update). Only
    when the stream is a terminal; idempotent."""
    stream = getattr(handler, "stream", None)
    isatty = getattr(stream, "isatty", None)
    if stream is None or getattr(handler, "_ctdiff_clears_line", False) or not (isatty and isatty()):
        return
    emit = handler.emit

    def emit_on_a_clear_line(record: logging.LogRecord) -> None:
        handler.acquire()
        try:
            handler.stream.write(CLEAR_LINE)
        finally:
            handler.release()
        emit(record)

    handler.emit = emit_on_a_clear_line  # type: ignore[method-assign]
    handler._ctdiff_clears_line = True  # type: ignore[attr-defined]


def console_handlers() -> list[logging.StreamHandler]:
    """The console handlers of this process's root and Prefect loggers (file handlers excluded)."""
    loggers = [logging.getLogger()] + [
        logging.getLogger(name) for name in list(logging.root.manager.loggerDict) if name.startswith("prefect")
    ]
    return [
        handler
        for logger in loggers
        for handler in getattr(logger, "handlers", [])
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
    ]


def training_reporter(bar: Progress) -> Callable[[dict], None]:
    """The progress callback of ctdiff's training loops: step, loss and latest val PSNR on `bar`."""

    def report(info: dict) -> None:
        postfix = {"loss": f"{info['loss']:.4f}"} if info.get("loss") is not None else {}
        if info.get("val_psnr") is not None:
            postfix["val_psnr"] = f"{info['val_psnr']:.2f}"
        bar.advance_to(info["step"], **postfix)

    return report
