"""flows/cli/_common.py: the one way to a database. Its engine is disposed even when the block fails; a
schema behind the latest migration stops every command with the step to take, and is left as it was:
only `db upgrade` and `demo` migrate."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from db.migrate import alembic_config, current_revision, head_revision, upgrade
from db.session import make_engine
from flows.cli._common import database, database_session
from flows.wiring.settings import NightreadSettings
from tests.unit.cli.invoke import db_upgrade, nightread, one_line


def _previous_revision() -> str:
    head = head_revision()
    assert head is not None
    previous = ScriptDirectory.from_config(alembic_config("sqlite://")).get_revision(head).down_revision
    assert isinstance(previous, str)
    return previous


def _revision(url: str) -> str | None:
    engine = make_engine(url)
    try:
        return current_revision(engine)
    finally:
        engine.dispose()


def test_the_engine_is_disposed_when_the_block_fails(tmp_path: Path) -> None:
    settings = NightreadSettings(data_dir=tmp_path)
    upgrade(settings.database_url)
    engines: list[Engine] = []

    def export() -> None:
        with database(settings) as engine:
            engines.append(engine)
            assert engine.pool.checkedin() == 1  # the schema check's connection, back in the pool
            raise OSError("disk full")  # as writing a fine-tuning set can

    with pytest.raises(OSError, match="disk full"):
        export()
    assert engines[0].pool.checkedin() == 0, "disposed: no connection left open"


def test_a_session_commits_or_rolls_back_on_a_database_at_head(tmp_path: Path) -> None:
    from db import repository as repo

    settings = NightreadSettings(data_dir=tmp_path)
    upgrade(settings.database_url)
    with database_session(settings) as session:
        repo.upsert_source(session=session, name="east", kind="dimse")

    def add_then_fail() -> None:
        with database_session(settings) as session:
            repo.upsert_source(session=session, name="west", kind="dimse")
            raise RuntimeError

    with pytest.raises(RuntimeError):
        add_then_fail()
    with database_session(settings) as session:
        assert [s.name for s in repo.list_sources(session=session)] == ["east"]


def test_a_new_or_old_schema_is_refused_and_left_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = NightreadSettings(data_dir=tmp_path)
    with pytest.raises(typer.Exit) as new, database(settings):
        pytest.fail("a database without a schema was used")
    assert new.value.exit_code == 1
    assert "the database has no schema yet: run `nightread db upgrade` first" in one_line(capsys.readouterr().err)
    assert _revision(settings.database_url) is None
    upgrade(settings.database_url, _previous_revision())
    with pytest.raises(typer.Exit), database(settings):
        pytest.fail("an old schema was used")
    said = one_line(capsys.readouterr().err)
    assert f"not up to date (revision {_previous_revision()}, latest {head_revision()})" in said
    assert _revision(settings.database_url) == _previous_revision()
    with database(settings, upgrade_to="head") as engine:
        assert current_revision(engine) == head_revision()


# one command of each group module that opens the database, and one that runs a flow
OLD_SCHEMA_COMMANDS = [
    ("status",),
    ("sources", "list"),
    ("listen", "--allow", "MODALITY1", "--port", "0"),
    ("rules", "explain", "1"),
    ("users", "list"),
    ("cohort", "--where", ""),
    ("models", "list"),
    ("run",),
]


def test_commands_on_an_old_schema_say_to_run_db_upgrade_and_do_not_migrate(tmp_path: Path) -> None:
    env = {"NIGHTREAD_DATA_DIR": str(tmp_path)}
    url = f"sqlite:///{tmp_path / 'nightread.db'}"
    db_upgrade(env, _previous_revision())
    for command in OLD_SCHEMA_COMMANDS:
        r = nightread(*command, env=env, timeout=120)
        assert r.returncode == 1, (command, r.stdout, r.stderr)
        assert "run `nightread db upgrade` first" in one_line(r.stderr), (command, r.stderr)
        assert _revision(url) == _previous_revision(), f"{command} migrated the database"
    db_upgrade(env)
    assert _revision(url) == head_revision()
    assert nightread("status", env=env).returncode == 0
