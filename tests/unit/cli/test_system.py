"""flows/cli/system.py: `nightread config`, `db upgrade` (`doctor` has tests/unit/test_doctor.py)."""

from __future__ import annotations

import json
from pathlib import Path

from db.migrate import head_revision
from tests.unit.cli.invoke import nightread


def test_config_masks_secrets(tmp_path: Path) -> None:
    r = nightread(
        "config",
        env={
            "NIGHTREAD_DATA_DIR": str(tmp_path),
            "NIGHTREAD_STORAGE__SECRET_KEY": "topsecret",
            "NIGHTREAD_DATABASE__URL": "postgresql+psycopg://u:pw123@h/db",
        },
    )
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["storage"]["secret_key"] == "**********"
    assert data["database"]["url"] == "postgresql+psycopg://u:***@h/db"
    assert "topsecret" not in r.stdout
    assert "pw123" not in r.stdout


def test_invalid_setting_is_named() -> None:
    r = nightread("config", env={"NIGHTREAD_PACS__RETRIEVE": "teleport"})
    assert r.returncode == 2
    assert "NIGHTREAD_PACS__RETRIEVE" in r.stderr


def test_db_upgrade_creates_the_schema_and_is_a_no_op_after(tmp_path: Path) -> None:
    env = {"NIGHTREAD_DATA_DIR": str(tmp_path)}
    r = nightread("db", "upgrade", env=env)
    assert r.returncode == 0, r.stderr
    assert f"at revision {head_revision()}" in r.stdout
    again = nightread("db", "upgrade", env=env)
    assert again.returncode == 0, again.stderr
    assert f"at revision {head_revision()}" in again.stdout
