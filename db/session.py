"""Engines and sessions. Nothing connects at import time."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Engine, event, exc, make_url
from sqlmodel import Session, create_engine


def make_engine(
    url: str, *, pool_size: int = 5, max_overflow: int = 5, echo: bool = False, foreign_keys: bool = True
) -> Engine:
    """An engine for `url`; SQLite files get WAL and foreign keys (off only for migrations, whose batch
    table rebuilds would trip them), Postgres a sized pool."""
    if url.startswith("sqlite"):
        _private_sqlite_file(make_url(url).database)
        engine = create_engine(url, echo=echo, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        if not foreign_keys:
            _transactional_ddl(engine)
        return engine
    return create_engine(url, echo=echo, pool_size=pool_size, max_overflow=max_overflow, pool_pre_ping=True)


def _private_sqlite_file(database: str | None) -> None:
    """Create a SQLite database file readable by its owner only (0600; SQLite gives its -wal and -shm files
    the database file's mode), and its folder 0700 when it is new: the file holds study UIDs and failures."""
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def _transactional_ddl(engine: Engine) -> None:
    """pysqlite commits before DDL on its own; take over BEGIN so a failed migration rolls back whole
    (SQLAlchemy's documented recipe for SQLite transactional DDL)."""

    @event.listens_for(engine, "connect")
    def _no_implicit_transactions(dbapi_conn, _record):  # type: ignore[no-untyped-def]
        dbapi_conn.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(conn):  # type: ignore[no-untyped-def]
        conn.exec_driver_sql("BEGIN")


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


T = TypeVar("T")


def is_disconnect(error: BaseException) -> bool:
    """True when `error` says the database could not be reached or dropped the connection (a restart, a
    failover, a network cut): worth waiting for, unlike a constraint or a syntax error. psycopg reports
    a refused or broken connection as OperationalError; SQLAlchemy marks what it invalidated."""
    if isinstance(error, exc.DBAPIError) and error.connection_invalidated:
        return True
    return isinstance(error, (exc.OperationalError, exc.InterfaceError)) and not isinstance(error, exc.IntegrityError)


def while_unreachable(
    call: Callable[[], T], *, outage_s: float, stopping: threading.Event | None = None, first_wait_s: float = 0.5
) -> T:
    """`call()`, called again while the database is unreachable, for up to `outage_s` in all (waits doubling
    from `first_wait_s` up to 5 s); a stop ends the waiting. `call` must be a whole transaction of its own
    (e.g. a `session_scope` block), so calling it again writes nothing twice."""
    deadline = time.monotonic() + outage_s
    wait = first_wait_s
    while True:
        try:
            return call()
        except Exception as error:
            left = deadline - time.monotonic()
            if not is_disconnect(error) or left <= 0 or (stopping is not None and stopping.is_set()):
                raise
            if stopping is not None:
                stopping.wait(min(wait, left))
            else:
                time.sleep(min(wait, left))
            wait = min(wait * 2, 5.0)
