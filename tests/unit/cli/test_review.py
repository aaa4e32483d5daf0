"""flows/cli/review.py: `nightread users …` and `audit export` as a shell runs them (the review page
itself, and the user commands in process, are in tests/unit/test_review.py)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from tests.unit.cli.invoke import db_upgrade, nightread


def test_users_and_audit_export(tmp_path: Path) -> None:
    from db import reviews
    from db.session import make_engine, session_scope
    from review.auth import verify_password

    env = {"NIGHTREAD_DATA_DIR": str(tmp_path)}
    db_upgrade(env)
    ok = nightread("users", "add", "rita", "--role", "reviewer", "--password-stdin", env=env, stdin="s3cret-enough\n")
    assert ok.returncode == 0, ok.stderr
    assert nightread("users", "add", "rita", "--password-stdin", env=env, stdin="another-one\n").returncode == 2
    short = nightread("users", "add", "bob", "--password-stdin", env=env, stdin="short\n")
    assert short.returncode == 2
    assert "at least 8" in short.stderr
    bad_role = nightread("users", "add", "bob", "--role", "boss", "--password-stdin", env=env, stdin="long enough\n")
    assert bad_role.returncode == 2
    assert "unknown role" in bad_role.stderr
    listed = json.loads(nightread("users", "list", "--json", env=env).stdout)
    assert [(u["name"], u["role"], u["disabled"]) for u in listed] == [("rita", "reviewer", False)]
    assert "s3cret" not in nightread("users", "list", env=env).stdout
    engine = make_engine(f"sqlite:///{tmp_path / 'nightread.db'}")
    with session_scope(engine) as session:
        user = reviews.get_user(session=session, name="rita")
        assert user is not None
        assert verify_password("s3cret-enough", user.password_hash)
        assert user.password_hash.startswith("$argon2id$")
    engine.dispose()
    assert nightread("users", "disable", "rita", env=env).returncode == 0
    assert json.loads(nightread("users", "list", "--json", env=env).stdout)[0]["disabled"] is True
    assert nightread("users", "disable", "nobody", env=env).returncode == 2
    out = tmp_path / "audit.csv"
    assert nightread("audit", "export", "--out", str(out), env=env).returncode == 0
    with out.open() as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames is not None
        assert "from_answer" in reader.fieldnames
        assert list(reader) == []
