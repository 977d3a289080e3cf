"""The local Prefect server that `ctdiff` commands report to when no PREFECT_API_URL is set.

Prefect's default without an API URL is a temporary server per run: ~8-15 s of start-up and
shut-down on every command, and a UI that is gone when the command ends. Instead, the first
command starts Prefect's server in the background (flows/prefect_server.py: what `prefect server
start` runs, with SQLite transactions that wait for the write lock), on a free loopback port with
its log beside its database in PREFECT_HOME, and records its address in
PREFECT_HOME/ctdiff-server.json; later commands find it there and start their flow at once, and
its UI shows every run. `ctdiff server stop` stops it; `ctdiff server status` tells where it is.

PREFECT_API_URL, when set, always wins (a team server, a cluster's server). CTDIFF_SERVER=embedded
asks for Prefect's temporary per-run server instead (nothing left running; the tests use it).

This module imports nothing of Prefect's: the server is looked for before the heavy imports of
a command, and starts while they run.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

STATE_FILE = "ctdiff-server.json"
LOG_FILE = "ctdiff-server.log"
MODE_VARIABLE = "CTDIFF_SERVER"  # "embedded": Prefect's temporary per-run server


def prefect_home() -> Path:
    """Prefect's home folder, as Prefect resolves it (PREFECT_HOME, else ~/.prefect)."""
    return Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # a child of this process that exited: reap it, so it reads dead
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: not ours
        return False
    return True


def healthy(api_url: str, timeout_s: float = 2.0) -> bool:
    """Whether a Prefect server answers its health check at `api_url`."""
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout_s) as answer:
            return answer.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


@dataclass(frozen=True)
class LocalServer:
    """The background server of one PREFECT_HOME."""

    home: Path

    @classmethod
    def of_this_user(cls) -> "LocalServer":
        return cls(prefect_home())

    @property
    def state_path(self) -> Path:
        return self.home / STATE_FILE

    @property
    def log_path(self) -> Path:
        return self.home / LOG_FILE

    def state(self) -> dict | None:
        """The recorded server ({pid, api_url}), or None when none is recorded or it has died."""
        try:
            state = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None  # a torn or foreign file: treated as no server, replaced on start
        if not isinstance(state, dict) or not _alive(int(state.get("pid", 0))):
            return None
        return state

    def ensure(self) -> tuple[str, bool]:
        """The API URL of the running server, starting one if there is none; and whether it was
        started now. Returns without waiting for a new server to answer: `wait` does that, so
        the caller's imports overlap the server's start-up."""
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.home / f"{STATE_FILE}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # two commands at once start one server
            state = self.state()
            if state is not None:
                return state["api_url"], False
            return self._start(), True

    def _start(self) -> str:
        port = _free_port()
        api_url = f"http://127.0.0.1:{port}/api"
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        env.update(
            PREFECT_HOME=str(self.home),
            PREFECT_UI_API_URL=api_url,  # the UI calls this server, not the default port
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
        )
        with open(self.log_path, "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "flows.prefect_server", "--host", "127.0.0.1", "--port", str(port)],
                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # outlives this command, and ^C here does not reach it
            )
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": process.pid, "api_url": api_url, "started": time.time()}))
        tmp.replace(self.state_path)
        return api_url

    def wait(self, api_url: str, timeout_s: float = 180.0) -> None:
        """Block until the server at `api_url` answers; a clear error naming its log if it
        exits or stays silent for `timeout_s` (its first start migrates a new database)."""
        deadline = time.monotonic() + timeout_s
        while not healthy(api_url):
            if self.state() is None:
                raise RuntimeError(f"the local Prefect server exited while starting; see {self.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the local Prefect server did not answer in {timeout_s:.0f} s; see {self.log_path}")
            time.sleep(0.25)

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Stop the recorded server (and what it started); False if none was running."""
        state = self.state()
        with contextlib.suppress(FileNotFoundError):
            self.state_path.unlink()
        if state is None:
            return False
        pid = int(state["pid"])
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        return True


def use_local_server() -> tuple[LocalServer, str, bool] | None:
    """Point this process (and the processes it starts) at the local background server, starting
    it if needed; None where PREFECT_API_URL is set or CTDIFF_SERVER=embedded. Returns the
    server, its API URL and whether it was started now (not yet waited for)."""
    if os.environ.get("PREFECT_API_URL") or os.environ.get(MODE_VARIABLE) == "embedded":
        return None
    server = LocalServer.of_this_user()
    api_url, started = server.ensure()
    os.environ["PREFECT_API_URL"] = api_url
    return server, api_url, started
