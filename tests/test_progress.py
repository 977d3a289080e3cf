"""Progress bars and log lines on one terminal: each log line on its own line, bars redrawn."""

import io
import logging
import sys

import pytest

import tasks.progress as progress_module
from tasks.progress import Progress, write_logs_around_bars


def rendered(line: str) -> str:
    """What a terminal shows of `line`: each carriage return writes over the line from its start."""
    shown: list[str] = []
    for segment in line.split("\r"):
        shown[: len(segment)] = segment
    return "".join(shown).rstrip()


@pytest.fixture
def stderr(monkeypatch):
    """A string for sys.stderr (the bars write there; each test puts it there itself, as pytest
    sets sys.stderr again when a test starts), and no Prefect artifacts (no server here)."""
    monkeypatch.setattr(progress_module, "create_progress_artifact", lambda **kwargs: "artifact")
    monkeypatch.setattr(progress_module, "update_progress_artifact", lambda *args, **kwargs: None)
    return io.StringIO()


@pytest.fixture
def logger(stderr):
    handler = logging.StreamHandler(stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s | %(message)s"))
    write_logs_around_bars(handler)
    write_logs_around_bars(handler)  # idempotent
    log = logging.getLogger("ctdiff.test_progress")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    yield log
    log.removeHandler(handler)


def test_a_log_line_written_while_a_bar_is_open_has_its_own_line(stderr, logger, monkeypatch):
    monkeypatch.setattr(sys, "stderr", stderr)
    with Progress(3, "case", "preprocess") as bar:
        bar.advance(case="a")
        logger.info("decoded case a")
        bar.advance(case="b")
        logger.warning("case b quarantined")
        bar.advance(case="c")
    lines = [rendered(line) for line in stderr.getvalue().split("\n")]
    assert "INFO | decoded case a" in lines, lines
    assert "WARNING | case b quarantined" in lines, lines
    for line in lines:  # no bar fragment on a log line, no log text on a bar's line
        assert not ("|" in line and "case" in line and ("it/s" in line or "case/s" in line or "preprocess" in line)
                    and ("decoded" in line or "quarantined" in line)), line
    assert "3/3" in lines[-1] or "3/3" in lines[-2], lines  # the bar, redrawn, ends complete


def test_a_log_line_without_an_open_bar_is_written_as_is(stderr, logger):
    logger.info("no bar")
    assert stderr.getvalue() == "INFO | no bar\n"


def test_the_bar_names_the_case_just_finished(stderr, monkeypatch):
    monkeypatch.setattr(sys, "stderr", stderr)
    with Progress(3, "case", "preprocess") as bar:
        bar._bar.mininterval = 0  # draw at each advance
        for case in ("a", "b", "c"):
            bar.advance(case=case)
            last_drawn = stderr.getvalue().split("\r")[-1]
            assert f"case={case}" in last_drawn, last_drawn
