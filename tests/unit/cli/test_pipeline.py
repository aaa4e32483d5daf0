"""flows/cli/pipeline.py: `nightread status`, `demo`, `run`, `backfill`, `reannotate` (`serve` has
tests/unit/test_deployments.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.unit.cli.invoke import db_upgrade, nightread, one_line


def test_status_needs_a_migrated_database_then_reports_json(tmp_path: Path) -> None:
    env = {"NIGHTREAD_DATA_DIR": str(tmp_path)}
    r = nightread("status", env=env)
    assert r.returncode == 1
    assert "run `nightread db upgrade` first" in one_line(r.stderr)
    db_upgrade(env)
    data = json.loads(nightread("status", "--json", env=env).stdout)
    assert data["studies"] == {"total": 0}
    assert data["last_run"] is None
    table = nightread("status", env=env)
    assert table.returncode == 0, table.stderr
    assert "last run" in table.stdout


@pytest.mark.slow
def test_demo_runs_end_to_end_and_twice(tmp_path: Path, tiny_model: Path) -> None:
    """`demo` sets its database up itself (the one command besides `db upgrade` that migrates)."""
    env = {"NIGHTREAD_INFERENCE__MODEL": str(tiny_model), "HF_HUB_OFFLINE": "1"}
    first = nightread("demo", "--data-dir", str(tmp_path / "d"), env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    for label in ("studies found", "images rendered", "captions", "findings", "flags", "failures", "wall time"):
        assert label in first.stdout
    assert str(tmp_path / "d" / "objects") in first.stdout.replace("\n", "")
    status = json.loads(nightread("status", "--json", env={**env, "NIGHTREAD_DATA_DIR": str(tmp_path / "d")}).stdout)
    assert status["studies"]["done"] == 5
    assert (status["captions"], status["images"]) == (12, 18)  # CT slices in 3 windows, one caption each
    second = nightread("demo", "--data-dir", str(tmp_path / "d"), env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    again = json.loads(nightread("status", "--json", env={**env, "NIGHTREAD_DATA_DIR": str(tmp_path / "d")}).stdout)
    assert {k: again[k] for k in ("images", "captions", "findings")} == {
        k: status[k] for k in ("images", "captions", "findings")
    }


def test_backfill_and_reannotate_refuse_bad_input_clearly(tmp_path: Path) -> None:
    env = {"NIGHTREAD_DATA_DIR": str(tmp_path)}
    db_upgrade(env)
    bad_date = nightread("backfill", "--from", "2024-02-30", "--to", "2024-03-01", env=env)
    assert bad_date.returncode == 2
    assert "YYYY-MM-DD" in bad_date.stderr
    backwards = nightread("backfill", "--from", "2024-03-02", "--to", "2024-03-01", env=env)
    assert backwards.returncode == 2
    assert "before its start" in backwards.stderr
    bad_where = nightread("reannotate", "--where", "pneumothorax >=", env=env)
    assert bad_where.returncode == 2
    assert "ends too early" in bad_where.stderr
