"""What every command group shares: the consoles, settings read at the edge, one way to fail, and the
one way to a database.

Every database use of the command line goes through `database()` (or `database_session()` and
`runtime()`, built on the same check): the engine is created there and disposed when the block ends,
error or not, and a database whose schema is not at the latest migration stops the command with a
line saying to run `nightread db upgrade`. Only `db upgrade` and `demo` migrate (`upgrade_to=`).
Queries live in `db/` (repository, reviews, ledger, cohort), never here."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlmodel import Session

    from flows.wiring.runtime import Runtime
    from flows.wiring.settings import NightreadSettings

console = Console()
err = Console(stderr=True)

UPGRADE_HINT = "run `nightread db upgrade` first"


def load_settings(**overrides: Any) -> NightreadSettings:
    """The settings (NIGHTREAD_* and `overrides`); a bad value exits 2 naming its variable."""
    from pydantic import ValidationError

    from flows.wiring.settings import NightreadSettings

    try:
        return NightreadSettings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = "__".join(str(p) for p in first["loc"]).upper()
        err.print(f"[red]invalid setting NIGHTREAD_{loc}: {first['msg']}[/red]")
        raise typer.Exit(2) from None


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print `message` in red on stderr; the exit to raise (`raise fail(...) from None`)."""
    err.print(f"[red]{message}[/red]")
    return typer.Exit(code)


def print_json(data: Any, *, indent: int | None = None) -> None:
    """`data` as JSON on stdout, for scripts (no markup, no wrapping)."""
    sys.stdout.write(json.dumps(data, indent=indent, default=str) + "\n")


# --- the database ---------------------------------------------------------------------------------


def require_schema_at_head(engine: Engine) -> None:
    """Exit 1 unless the database's schema is at the latest migration (it is never migrated here)."""
    from db.migrate import current_revision, head_revision

    current, head = current_revision(engine), head_revision()
    if current is None:
        raise fail(f"the database has no schema yet: {UPGRADE_HINT}")
    if current != head:
        raise fail(f"the database schema is not up to date (revision {current}, latest {head}): {UPGRADE_HINT}")


@contextmanager
def database(settings: NightreadSettings | None = None, *, upgrade_to: str | None = None) -> Iterator[Engine]:
    """An engine on the configured database, disposed when the block ends (error or not). Its schema
    must be at the latest migration; with `upgrade_to` (only `db upgrade` and `demo`) it is first
    migrated to that revision instead."""
    from db.migrate import upgrade
    from db.session import make_engine

    settings = settings or load_settings()
    if upgrade_to is not None:
        upgrade(settings.database_url, upgrade_to)
    engine = make_engine(settings.database_url)
    try:
        if upgrade_to is None:
            require_schema_at_head(engine)
        yield engine
    finally:
        engine.dispose()


@contextmanager
def database_session(settings: NightreadSettings | None = None) -> Iterator[Session]:
    """A session on `database()`: committed when the block ends, rolled back on an error."""
    from db.session import session_scope

    with database(settings) as engine, session_scope(engine) as session:
        yield session


@contextmanager
def runtime(settings: NightreadSettings) -> Iterator[Runtime]:
    """The flows' runtime (database, object store, sources, rules) for a command that uses them
    directly, on a database at the latest migration; closed when the block ends."""
    from flows.wiring.runtime import Runtime

    with Runtime.build(settings) as rt:
        require_schema_at_head(rt.engine)
        yield rt


def require_current_schema(settings: NightreadSettings) -> None:
    """Exit 1 unless the database's schema is at the latest migration: for commands whose flows open
    the database themselves."""
    with database(settings):
        pass


def flow_settings() -> NightreadSettings:
    """Settings for a command that runs a flow: Prefect's log level at WARNING (the command prints its
    own summary), and the database schema checked before the flow starts."""
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    settings = load_settings()
    require_current_schema(settings)
    return settings


def serve_metrics(settings: NightreadSettings, engine: Engine) -> None:
    """The /metrics endpoint of a long-running command, when NIGHTREAD_METRICS__PORT is set."""
    from flows.wiring.telemetry import serve_metrics as start

    port = start(settings, engine)
    if port is not None:
        console.print(f"metrics on http://{settings.metrics.host}:{port}/metrics")
