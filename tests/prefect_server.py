"""A real `prefect server` on a free loopback port, for the tests that drive one (deployments,
the Docker work pool, the UI in a browser), and a way to stop what they start."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil

BIN = Path(sys.executable).parent  # prefect, hadolint: installed beside this interpreter


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop(process: subprocess.Popen) -> None:
    """Stop a process started in its own session, and everything it started.

    Descendants are collected first: a process worker starts each flow run in a process group
    of its own, which a signal to the worker's group would miss.
    """
    try:
        descendants = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    for child in descendants:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.terminate()
    _, alive = psutil.wait_procs(descendants, timeout=20)
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


@contextlib.contextmanager
def prefect_server(root: Path, **settings: str) -> Iterator[tuple[str, dict[str, str]]]:
    """Start `prefect server` with its own PREFECT_HOME under `root`; yield (API URL, the
    environment for clients and workers of it: no other PREFECT_* setting leaks in, `settings`
    added). Stopped, with what it started, on exit."""
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHON=sys.executable,
        PREFECT_HOME=str(root / "home"),
        PREFECT_API_URL=api_url,
        PREFECT_UI_API_URL=api_url,  # the UI must call this server, not the default :4200
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        **settings,
    )
    log = root / "server.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [BIN / "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 240  # ~20-40 s on two busy cores, migrations included
        while True:
            assert server.poll() is None, f"prefect server exited:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{api_url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"prefect server did not answer:\n{log.read_text()[-3000:]}"
            time.sleep(1)
        yield api_url, env
    finally:
        stop(server)


def deploy_all(env: dict[str, str], *assignments: str) -> None:
    """deployments/setup.sh against the server of `env`: every pool and deployment."""
    root = Path(__file__).resolve().parent.parent
    setup = subprocess.run(["bash", "deployments/setup.sh", *assignments],
                           cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert setup.returncode == 0, setup.stdout[-3000:] + setup.stderr[-3000:]


def run_on_worker(env: dict[str, str], pool: str, deployment: str, params: list[str], cwd: Path,
                  timeout_s: int = 600) -> tuple[subprocess.CompletedProcess, str]:
    """Start a `prefect worker` of `pool`, run `deployment` with `--param`s and watch it to its
    end; return the watch's result and the tail of the worker's log (the worker is stopped)."""
    with open(cwd / "worker.log", "wb") as out:
        worker = subprocess.Popen(
            [BIN / "prefect", "worker", "start", "--pool", pool, "--limit", "1"],
            cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        run = subprocess.run(
            [BIN / "prefect", "deployment", "run", deployment, *(arg for p in params for arg in ("--param", p)),
             "--watch", "--watch-timeout", str(timeout_s - 60)],
            cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s,
        )
    finally:
        stop(worker)
    return run, (cwd / "worker.log").read_text()[-4000:]
