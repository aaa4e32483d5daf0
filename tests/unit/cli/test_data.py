"""flows/cli/data.py: `nightread cohort` and `deid reidentify` (a de-identified export from the command
line is in tests/unit/test_deid.py)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from tests.unit.cli.invoke import db_upgrade, nightread


def test_cohort_export_from_the_cli(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from db.migrate import upgrade
    from db.session import make_engine
    from integrations.storage import LocalObjectStore
    from tests.review_seed import seed

    upgrade(f"sqlite:///{tmp_path / 'nightread.db'}")
    engine = make_engine(f"sqlite:///{tmp_path / 'nightread.db'}")
    seed(engine, LocalObjectStore(tmp_path / "objects"))
    engine.dispose()
    env = {"NIGHTREAD_DATA_DIR": str(tmp_path)}
    out = tmp_path / "x" / "cohort.parquet"
    r = nightread(
        "cohort",
        "--where",
        "pleural_effusion >= 0.8",
        "--per",
        "image",
        "--out",
        str(out),
        "--finetune",
        str(tmp_path / "ft"),
        "--answers",
        "model",
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert "1 image(s) match" in r.stdout
    assert len((tmp_path / "ft" / "train.jsonl").read_text().splitlines()) == 1
    assert pq.read_table(out).num_rows == 1
    assert (tmp_path / "x" / "cohort.parquet.manifest.json").exists()
    with sqlite3.connect(tmp_path / "nightread.db") as conn:  # the export is in the audit log
        (detail,) = conn.execute("SELECT detail FROM audit_event WHERE action = 'cohort_exported'").fetchone()
    assert detail.startswith("1 image row(s); table=True finetune=True deid=False; where: pleural_effusion")
    bad = nightread("cohort", "--where", "pleural_effusion >= maybe", env=env)
    assert bad.returncode == 2
    assert "cohort expression" in bad.stderr
    counted = nightread("cohort", "--where", "pleural_effusion >= 0.8", env=env)
    assert counted.returncode == 0, counted.stderr
    assert "1 study(s) match" in counted.stdout


def test_cohort_refuses_bad_options_before_the_database(tmp_path: Path) -> None:
    env = {"NIGHTREAD_DATA_DIR": str(tmp_path)}
    per = nightread("cohort", "--per", "patient", env=env)
    assert per.returncode == 2
    assert "--per takes study or image" in per.stderr
    assert not (tmp_path / "nightread.db").exists()


def test_reidentify_an_unknown_pseudonym(tmp_path: Path) -> None:
    env = {"NIGHTREAD_DATA_DIR": str(tmp_path)}
    db_upgrade(env)
    r = nightread("deid", "reidentify", "NRP0000", env=env)
    assert r.returncode == 1
    assert "no such pseudonym" in r.stderr
    with sqlite3.connect(tmp_path / "nightread.db") as conn:  # asking is audited, found or not
        (detail,) = conn.execute("SELECT detail FROM audit_event WHERE action = 'reidentified'").fetchone()
    assert detail == "0 original(s): none"
