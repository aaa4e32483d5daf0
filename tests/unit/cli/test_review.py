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


def test_the_review_page_writes_a_verified_report_when_a_studys_flags_are_all_decided(
    prefect_harness, make_settings, sample_pacs
) -> None:  # type: ignore[no-untyped-def]
    """`build_review_app` wires the page's hook to flows/writeback.py: once every flagged finding of a
    study is decided, a new VERIFIED SR version exists beside the model's own report."""
    from sqlmodel import col, select

    from db import reviews
    from db.migrate import upgrade
    from db.models import Finding, Image, Role, StructuredReport
    from db.session import make_engine, session_scope
    from flows.cli.review import build_review_app
    from flows.nightly import run_nightly

    settings = make_settings(pacs={"port": sample_pacs.port, "called_ae": sample_pacs.ae_title})
    upgrade(settings.database_url)
    run_nightly(settings)
    engine = make_engine(settings.database_url)
    app = build_review_app(settings, engine)
    hook = app.state.review.config.on_study_decided
    assert hook is not None
    with session_scope(engine) as session:
        user = reviews.add_user(session=session, name="rita", role=Role.REVIEWER, password_hash="x")
        report = session.exec(select(StructuredReport)).first()
        assert report is not None
        study_id = report.study_id
        findings = session.exec(
            select(Finding).join(Image, col(Image.id) == Finding.image_id).where(Image.study_id == study_id)
        ).all()
        to_decide = [f for f in findings if f.flagged] or findings[:1]  # every flag, or one finding at least
        for finding in to_decide:
            assert finding.id is not None
            reviews.decide(session=session, user=user, finding_id=finding.id, decision="confirm")
    hook(study_id)
    with session_scope(engine) as session:
        versions = session.exec(select(StructuredReport).where(StructuredReport.study_id == study_id)).all()
    verified = [r for r in versions if r.verified]
    assert len(verified) == 1
    assert verified[0].predecessor_id == report.id
    hook(study_id)  # no new decision: nothing more
    with session_scope(engine) as session:
        assert len(session.exec(select(StructuredReport).where(StructuredReport.study_id == study_id)).all()) == 2
    engine.dispose()
    off = build_review_app(make_settings(review={"verified_reports": False}), make_engine(settings.database_url))
    assert off.state.review.config.on_study_decided is None
