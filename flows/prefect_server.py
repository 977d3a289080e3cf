"""The process of ctdiff's local Prefect server (flows/local_server.py starts it):
`python -m flows.prefect_server --port N` serves Prefect's API, UI and services, as
`prefect server start` does, with one change for its SQLite database.

Prefect begins SQLite transactions DEFERRED. One that reads and then writes fails at once with
`database is locked` when another connection committed in between (a WAL read snapshot cannot be
upgraded to a write, and SQLite's busy timeout does not apply), and the client retries the
request about 2 s later. Between two flow runs this happens almost every time: the server's
task-run recorder is still writing the previous flow's task runs from their events when the next
sub-flow's parent task run is created (that insert follows a read of the flow run's labels). Two
such retries were 4 s of a no-op `ctdiff demo`'s 14. Here every transaction begins IMMEDIATE,
taking the write lock up front and waiting for it under the busy timeout instead; on one user's
local server the wait is milliseconds. A PostgreSQL connection URL is served unchanged.

A new SQLite database is not migrated from nothing (Prefect's 100-odd migrations take ~13 s on two
cores, most of a first command's wait) but made from the schema they produce, kept beside this
module as SQL (prefect-sqlite-schema.sql, with the migration revision it stands at). Prefect then
migrates it from that revision to its own head as usual: nothing when they are the same, the newer
migrations when the installed Prefect is newer. A schema from a revision the installed Prefect does
not know is not used. `python -m flows.prefect_server --write-schema` writes the file anew from
Prefect's migrations (after changing the Prefect pin); tests/test_local_server.py checks that a
database made from it and migrated equals one migrated from nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

from prefect.server.database import dependencies
from prefect.server.database.configurations import AioSqliteConfiguration
from prefect.server.utilities.database import get_dialect
from prefect.settings import (
    PREFECT_API_DATABASE_CONNECTION_URL,
    PREFECT_SERVER_API_KEEPALIVE_TIMEOUT,
    PREFECT_SERVER_API_WEBSOCKET_PING_INTERVAL,
    PREFECT_SERVER_API_WEBSOCKET_PING_TIMEOUT,
    PREFECT_SERVER_LOGGING_LEVEL,
)


class WriteLockingSqliteConfiguration(AioSqliteConfiguration):
    """Prefect's SQLite configuration with every transaction begun IMMEDIATE (see above)."""

    def begin_transaction(self, session, with_for_update: bool = False):
        # In the SQLite configuration, with_for_update chooses BEGIN IMMEDIATE and nothing else.
        return super().begin_transaction(session, with_for_update=True)


def use_write_locking_sqlite() -> bool:
    """Make this process's Prefect server use WriteLockingSqliteConfiguration when its database is
    SQLite; returns whether it does."""
    url = PREFECT_API_DATABASE_CONNECTION_URL.value()
    if get_dialect(url).name != "sqlite":
        return False
    dependencies.MODELS_DEPENDENCIES["database_config"] = WriteLockingSqliteConfiguration(connection_url=url)
    return True


SCHEMA_FILE = Path(__file__).with_name("prefect-sqlite-schema.sql")
_REVISION_MARK = "-- alembic revision: "


def sqlite_path(url: str) -> Path | None:
    """The file of an SQLite connection URL (None for another database or an in-memory one)."""
    if get_dialect(url).name != "sqlite":
        return None
    path = url.split(":///", 1)[1].split("?", 1)[0] if ":///" in url else ""
    return Path(path) if path and path != ":memory:" else None


def schema_revision(schema_file: Path = SCHEMA_FILE) -> str:
    """The Prefect migration revision a schema file stands at (its first line)."""
    with open(schema_file) as f:
        first = f.readline().strip()
    if not first.startswith(_REVISION_MARK):
        raise ValueError(f"{schema_file} does not start with '{_REVISION_MARK}<revision>'")
    return first[len(_REVISION_MARK):]


def known_revisions() -> set[str]:
    """Every migration revision of the installed Prefect's SQLite migrations."""
    from alembic.script import ScriptDirectory
    from prefect.server.database.alembic_commands import alembic_config
    from prefect.server.database.orm_models import AioSqliteORMConfiguration

    config = alembic_config()  # Prefect's migration env.py names the dialect's versions at run time
    config.set_main_option("version_locations", str(AioSqliteORMConfiguration().versions_dir))
    return {script.revision for script in ScriptDirectory.from_config(config).walk_revisions()}


def seed_sqlite_database(path: Path, schema_file: Path = SCHEMA_FILE) -> str | None:
    """Make a new SQLite database at `path` from the schema file; returns its revision, or None
    where nothing was made: `path` exists, or the installed Prefect does not know the revision
    (then Prefect migrates a new database from nothing, as without this)."""
    if path.exists():
        return None
    revision = schema_revision(schema_file)
    if revision not in known_revisions():
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        with sqlite3.connect(tmp) as db:
            db.executescript(schema_file.read_text())
        db.close()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return revision


def migrated_sqlite_database(path: Path, env: dict[str, str] | None = None) -> None:
    """Migrate the SQLite database at `path` to the installed Prefect's head with Prefect's own
    command, in a process of its own (this process's Prefect settings are left alone)."""
    env = {**(os.environ if env is None else env),
           "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{path}"}
    prefect = shutil.which("prefect", path=str(Path(sys.executable).parent)) or shutil.which("prefect")
    if prefect is None:
        raise RuntimeError("the `prefect` command is not installed beside this Python")
    done = subprocess.run([prefect, "server", "database", "upgrade", "-y"], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"`prefect server database upgrade` failed on {path}:\n{done.stderr[-2000:]}")


def sqlite_schema_sql(path: Path) -> str:
    """The SQL that remakes the database at `path` (its schema and rows), headed by its revision."""
    with sqlite3.connect(path) as db:
        (revision,) = db.execute("SELECT version_num FROM alembic_version").fetchone()
        lines = [line for line in db.iterdump() if line not in ("BEGIN TRANSACTION;", "COMMIT;")]
    db.close()
    return "\n".join([f"{_REVISION_MARK}{revision}", "BEGIN TRANSACTION;", *lines, "COMMIT;", ""])


def write_schema(schema_file: Path = SCHEMA_FILE) -> str:
    """Write the schema file from Prefect's migrations of a new database; returns its revision."""
    with tempfile.TemporaryDirectory() as tmp:
        database = Path(tmp) / "prefect.db"
        migrated_sqlite_database(database)
        schema_file.write_text(sqlite_schema_sql(database))
    return schema_revision(schema_file)


def main(argv: list[str] | None = None) -> None:
    import uvicorn
    from prefect.server.api.server import create_app

    parser = argparse.ArgumentParser(prog="python -m flows.prefect_server", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int)
    parser.add_argument("--write-schema", action="store_true",
                        help=f"write {SCHEMA_FILE.name} from Prefect's migrations and exit")
    args = parser.parse_args(argv)
    if args.write_schema:
        print(f"wrote {SCHEMA_FILE} (revision {write_schema()})")
        return
    if args.port is None:
        parser.error("--port is required")
    database = sqlite_path(PREFECT_API_DATABASE_CONNECTION_URL.value())
    if database is not None and (revision := seed_sqlite_database(database)) is not None:
        print(f"made a new database {database} from {SCHEMA_FILE.name} (revision {revision})", flush=True)
    locking = use_write_locking_sqlite()
    base_url = f"http://{args.host}:{args.port}"
    print(f"Prefect server for ctdiff: API {base_url}/api, UI {base_url}"
          f"{' (SQLite transactions begin IMMEDIATE)' if locking else ''}", flush=True)
    uvicorn.run(
        app=create_app(final=True),
        host=args.host,
        port=args.port,
        timeout_keep_alive=PREFECT_SERVER_API_KEEPALIVE_TIMEOUT.value(),
        ws_ping_interval=PREFECT_SERVER_API_WEBSOCKET_PING_INTERVAL.value(),
        ws_ping_timeout=PREFECT_SERVER_API_WEBSOCKET_PING_TIMEOUT.value(),
        log_level=PREFECT_SERVER_LOGGING_LEVEL.value().lower(),
    )


if __name__ == "__main__":
    main()
