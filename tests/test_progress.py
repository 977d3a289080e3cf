"""Progress bars and log lines on one terminal: each log line on its own line, bars redrawn."""

import io
import logging
import sys

import pytest
from prefect.logging.configuration import ensure_logging_setup

import tasks.progress as progress_module
from tasks.progress import CLEAR_LINE, Progress, clear_line_before_logs, write_logs_around_bars
from tasks.runners import ClearLineBeforeLogs


def rendered(line: str) -> str:
    """What a terminal shows of `line`: each carriage return writes over the line from its start."""
    shown: list[str] = []
    for erased in line.split(CLEAR_LINE):
        shown = []
        for segment in erased.split("\r"):
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


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_worker_log_line_erases_the_bar_another_process_drew_on_the_line():
    terminal = Terminal()
    handler = logging.StreamHandler(terminal)
    handler.setFormatter(logging.Formatter("%(levelname)s | %(message)s"))
    clear_line_before_logs(handler)
    clear_line_before_logs(handler)  # idempotent
    terminal.write("\rpreprocess:  40%|####      | 2/5 [00:04<00:06, case=b]")  # the CLI's bar, mid-line
    handler.emit(logging.LogRecord("prefect.task_runs", logging.INFO, __file__, 1, "Finished in state Completed()", None, None))
    lines = terminal.getvalue().split("\n")
    assert rendered(lines[0]) == "INFO | Finished in state Completed()", lines
    assert terminal.getvalue().count(CLEAR_LINE) == 1


def test_a_handler_on_a_file_or_pipe_is_left_as_it_is():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    clear_line_before_logs(handler)
    handler.emit(logging.LogRecord("prefect", logging.INFO, __file__, 1, "plain", None, None))
    assert stream.getvalue() == "plain\n"


def test_the_worker_plugin_makes_prefect_console_handlers_clear_the_line():
    ensure_logging_setup()  # as in a worker, where the plugin finds Prefect's handlers made
    terminal = Terminal()
    handler = logging.StreamHandler(terminal)
    prefect_logger = logging.getLogger("prefect.ctdiff_test_worker")
    prefect_logger.addHandler(handler)
    try:
        ClearLineBeforeLogs().setup(worker=None)
        handler.emit(logging.LogRecord("prefect", logging.INFO, __file__, 1, "from a worker", None, None))
    finally:
        prefect_logger.removeHandler(handler)
    assert terminal.getvalue() == CLEAR_LINE + "from a worker\n"
