"""The local Prefect server `ctdiff` commands share (flows/local_server.py): started once, in the
background, found again by later commands, stopped by `ctdiff server stop`; PREFECT_API_URL and
CTDIFF_SERVER=embedded opt out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from ctdiff.synth import SynthSpec, synthesize
from flows.local_server import LOG_FILE, MODE_VARIABLE, STATE_FILE, LocalServer, _alive, use_local_server

CTDIFF = [sys.executable, "-m", "flows.cli"]


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != MODE_VARIABLE}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return env


def _ctdiff(env: dict, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CTDIFF, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_commands_share_one_background_server(tmp_path):
    home, env = tmp_path / "home", _env(tmp_path / "home")
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = str(root)
    assert _ctdiff(env, tmp_path, "server", "status").returncode == 1

    # Two commands at once start one server between them.
    starts = [subprocess.Popen([*CTDIFF, "server", "start"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [process.communicate(timeout=300) for process in starts]
    assert [process.returncode for process in starts] == [0, 0], outputs
    said = sorted(out.split(":", 1)[0] for out, _ in outputs)
    assert said == ["local Prefect server already running", "local Prefect server started"], outputs
    state = json.loads((home / STATE_FILE).read_text())
    assert all(state["api_url"] in out for out, _ in outputs)
    assert "SQLite transactions begin IMMEDIATE" in (home / LOG_FILE).read_text()  # flows/prefect_server.py
    try:
        synthesize(tmp_path / "cases", SynthSpec(n_cases=2, size=16, n_thin=10))
        args = ["preprocess", "--set", "paths.input=cases", "--set", "paths.store=store.zarr",
                "--set", "preprocess.resolution=null", "--set", "preprocess.dask.n_workers=1"]
        first, again = _ctdiff(env, tmp_path, *args), _ctdiff(env, tmp_path, *args)
        assert first.returncode == 0 and again.returncode == 0, first.stderr[-2000:] + again.stderr[-2000:]
        for run in (first, again):
            assert "Starting temporary server" not in run.stderr and "started a local Prefect server" not in run.stderr
        # A rerun finds every case in the store: no Dask cluster, the steps are cache hits.
        assert "Creating a new Dask cluster" in first.stderr and "Creating a new Dask cluster" not in again.stderr
        assert "all 2 cases are in the store already" in again.stderr
        assert again.stderr.count("Finished in state Cached") == 2  # the ingest task of each case
        runs = httpx.post(f"{state['api_url']}/flow_runs/filter", json={}).json()
        names = sorted(httpx.get(f"{state['api_url']}/flows/{r['flow_id']}").json()["name"] for r in runs)
        assert names == ["ingest-cases", "preprocess", "preprocess"]  # both commands' runs, in one server
    finally:
        stop = _ctdiff(env, tmp_path, "server", "stop")
    assert stop.returncode == 0 and stop.stdout.strip() == "stopped the local Prefect server"
    assert not _alive(state["pid"]) and not (home / STATE_FILE).exists()
    assert _ctdiff(env, tmp_path, "server", "stop").returncode == 1


def test_prefect_api_url_and_embedded_mode_start_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    monkeypatch.delenv(MODE_VARIABLE, raising=False)
    monkeypatch.setenv("PREFECT_API_URL", "http://prefect.example:4200/api")
    assert use_local_server() is None
    monkeypatch.delenv("PREFECT_API_URL")
    monkeypatch.setenv(MODE_VARIABLE, "embedded")
    assert use_local_server() is None
    assert not (tmp_path / STATE_FILE).exists()


def test_a_recorded_server_that_died_is_no_server(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / STATE_FILE).write_text(json.dumps({"pid": gone.pid, "api_url": "http://127.0.0.1:9/api"}))
    server = LocalServer(tmp_path)
    assert server.state() is None
    assert server.stop() is False and not (tmp_path / STATE_FILE).exists()
    (tmp_path / STATE_FILE).write_text("{torn")
    assert server.state() is None


async def _read_then_write_across_a_commit(config) -> tuple[bool, int]:
    """Transaction A reads, transaction B (another connection) writes, then A writes; returns
    whether B had committed before A wrote, and the rows in the end."""
    import asyncio

    from sqlalchemy import text

    engine = await config.engine()
    async with engine.begin() as connection:
        await connection.execute(text("CREATE TABLE t (x INTEGER)"))

    async def insert(session, value: int) -> None:
        async with config.begin_transaction(session):
            await session.execute(text("INSERT INTO t VALUES (:x)"), {"x": value})

    a, b = await config.session(engine), await config.session(engine)
    async with a, b:
        async with config.begin_transaction(a):
            await a.execute(text("SELECT count(*) FROM t"))
            writer = asyncio.create_task(insert(b, 2))
            done, _ = await asyncio.wait({writer}, timeout=1.0)
            await a.execute(text("INSERT INTO t VALUES (1)"))
        await writer
        async with engine.connect() as connection:
            rows = (await connection.execute(text("SELECT count(*) FROM t"))).scalar_one()
    await engine.dispose()
    return bool(done), rows


def test_server_sqlite_transactions_wait_for_the_write_lock(tmp_path, monkeypatch):
    """Prefect's SQLite transactions begin DEFERRED: one that read before another connection
    committed cannot write (`database is locked`, retried by the client 2 s later). The local
    server's begin IMMEDIATE, so the second writer waits for the first instead."""
    import asyncio

    import sqlalchemy.exc
    from prefect.server.database import dependencies
    from prefect.server.database.configurations import AioSqliteConfiguration
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL, temporary_settings

    from flows.prefect_server import WriteLockingSqliteConfiguration, use_write_locking_sqlite

    prefects = AioSqliteConfiguration(connection_url=f"sqlite+aiosqlite:///{tmp_path / 'deferred.db'}")
    with pytest.raises(sqlalchemy.exc.OperationalError, match="database is locked"):
        asyncio.run(_read_then_write_across_a_commit(prefects))

    url = f"sqlite+aiosqlite:///{tmp_path / 'immediate.db'}"
    monkeypatch.setitem(dependencies.MODELS_DEPENDENCIES, "database_config", None)
    with temporary_settings({PREFECT_API_DATABASE_CONNECTION_URL: url}):
        assert use_write_locking_sqlite()
    config = dependencies.MODELS_DEPENDENCIES["database_config"]
    assert isinstance(config, WriteLockingSqliteConfiguration) and config.connection_url == url
    b_committed_first, rows = asyncio.run(_read_then_write_across_a_commit(config))
    assert not b_committed_first and rows == 2  # B waited for A's write lock; both rows written

    with temporary_settings({PREFECT_API_DATABASE_CONNECTION_URL: "postgresql+asyncpg://u:p@db/prefect"}):
        assert not use_write_locking_sqlite()


def _schema(path: Path) -> list[tuple]:
    """Every table, index and the revision of an SQLite database. A table's named constraints are
    compared as a set: Prefect's table-rebuilding migrations write them in an order that differs
    from one run of the same migrations to the next."""
    import sqlite3

    def definition(sql: str | None) -> tuple:
        lines = [line.strip().rstrip(",").strip() for line in (sql or "").splitlines()]
        return (tuple(line for line in lines if not line.startswith("CONSTRAINT")),
                tuple(sorted(line for line in lines if line.startswith("CONSTRAINT"))))

    with sqlite3.connect(path) as db:
        rows = [(kind, name, table, definition(sql)) for kind, name, table, sql in
                db.execute("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name")]
        rows += db.execute("SELECT 'revision', version_num, '', '' FROM alembic_version").fetchall()
    db.close()
    return rows


@pytest.mark.slow
def test_a_new_server_database_from_the_schema_equals_one_migrated_from_nothing(tmp_path):
    """flows/prefect-sqlite-schema.sql stands for Prefect's migrations of a new SQLite database:
    a database made from it and then migrated by the installed Prefect (nothing to do at the same
    revision) has the same tables, indexes and revision as one migrated from nothing."""
    from flows.prefect_server import migrated_sqlite_database, schema_revision, seed_sqlite_database

    env = _env(tmp_path / "home")
    reference, seeded = tmp_path / "reference.db", tmp_path / "seeded" / "prefect.db"
    migrated_sqlite_database(reference, env)
    assert seed_sqlite_database(seeded) == schema_revision()
    assert [p.name for p in seeded.parent.iterdir()] == ["prefect.db"]  # no temporary file left
    migrated_sqlite_database(seeded, env)
    expected = _schema(reference)
    assert len([row for row in expected if row[0] == "table"]) > 20
    assert _schema(seeded) == expected


def test_a_schema_is_used_only_for_a_new_database_at_a_known_revision(tmp_path):
    from flows.prefect_server import SCHEMA_FILE, seed_sqlite_database, sqlite_path

    existing = tmp_path / "existing.db"
    existing.write_bytes(b"")
    assert seed_sqlite_database(existing) is None and existing.read_bytes() == b""
    unknown = tmp_path / "unknown.sql"
    unknown.write_text(SCHEMA_FILE.read_text().replace("-- alembic revision: ", "-- alembic revision: 0ff", 1))
    assert seed_sqlite_database(tmp_path / "new.db", unknown) is None and not (tmp_path / "new.db").exists()
    assert sqlite_path("sqlite+aiosqlite:////data/prefect.db") == Path("/data/prefect.db")
    assert sqlite_path("sqlite+aiosqlite:///:memory:") is None
    assert sqlite_path("postgresql+asyncpg://u:p@db:5432/prefect") is None
