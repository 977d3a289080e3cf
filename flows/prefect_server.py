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
"""

from __future__ import annotations

import argparse

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


def main(argv: list[str] | None = None) -> None:
    import uvicorn
    from prefect.server.api.server import create_app

    parser = argparse.ArgumentParser(prog="python -m flows.prefect_server", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
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
