"""The review audit trail: every decision with who, when and from which answer to which; the CSV exports
(formulas neutralised); the `users` commands audited, never echoing a password."""

from __future__ import annotations

import csv
import io

from fastapi.testclient import TestClient

from db import reviews
from db.session import session_scope
from tests.unit.review.support import events, login, nightread, no_secret_in_audit


def test_audit_rows_and_csv(env):
    engine, seeded, _ = env
    with session_scope(engine) as session:
        rita = reviews.get_user(session=session, name="rita")
        assert rita is not None
        f = seeded.finding_ids["cardiomegaly"]
        reviews.decide(session=session, user=rita, finding_id=f, decision="correct", to_answer="no")
        reviews.decide(session=session, user=rita, finding_id=f, decision="comment", comment="borderline")
        reviews.decide(session=session, user=rita, finding_id=f, decision="correct", to_answer="yes")
        rows = reviews.audit_rows(session=session)
    assert [(r["decision"], r["from_answer"], r["to_answer"]) for r in rows] == [
        ("correct", "yes", "no"),
        ("comment", "no", ""),
        ("correct", "no", "yes"),
    ]
    buf = io.StringIO()
    assert reviews.write_csv(rows=rows, fields=reviews.AUDIT_DECISION_FIELDS, out=buf) == 3
    assert next(csv.DictReader(io.StringIO(buf.getvalue())))["user"] == "rita"


def test_audit_csv_neutralises_formulas(make_app, tmp_path):
    """Cells a spreadsheet would run (= + - @ tab CR first) start with a ' in both exports (OWASP)."""
    engine = make_app.engine
    comments = ['=HYPERLINK("http://evil.example","x")', "@SUM(A1)", "+1+1", "-2+3", "plain; fine"]
    details = ["=cmd|' /C calc'!A0", "\tTAB", "\rCR=1+1"]
    with session_scope(engine) as session:
        rita = reviews.get_user(session=session, name="rita")
        assert rita is not None
        for comment in comments:
            reviews.decide(
                session=session,
                user=rita,
                finding_id=make_app.seeded.finding_ids["cardiomegaly"],
                decision="comment",
                comment=comment,
            )
        for detail in details:
            reviews.audit(session=session, action="user_added", actor="test", detail=detail)
    out = tmp_path / "decisions.csv"
    r = nightread(make_app, "audit", "export", "--out", str(out))
    assert r.exit_code == 0, r.output
    with out.open(newline="") as fh:
        written = [row["comment"] for row in csv.DictReader(fh)]
    assert written == ["'" + c for c in comments[:-1]] + ["plain; fine"]
    log = nightread(make_app, "audit", "export", "--events").stdout
    rows = list(csv.DictReader(io.StringIO(log, newline="")))
    assert ["'" + d for d in details] == [row["detail"] for row in rows if row["actor"] == "test"]
    for row in rows:
        assert not any(str(v).startswith(reviews.FORMULA_STARTS) for v in row.values()), row
    assert [e["detail"] for e in events(engine, "audit_exported")] == [
        "5 decision(s) to a file",
        f"{len(rows)} audit event(s) to stdout",
    ]
    assert reviews.csv_cell(-1) == -1, "numbers stay numbers"


def test_user_commands_are_audited_and_never_echo_a_password(make_app):
    client = TestClient(make_app())
    first, second = "first passphrase 1", "second passphrase 2"
    added = nightread(make_app, "users", "add", "bob", "--role", "viewer", "--password-stdin", stdin=first)
    assert added.exit_code == 0
    assert nightread(make_app, "users", "set-role", "bob", "reviewer").exit_code == 0
    bad = nightread(make_app, "users", "set-role", "bob", "boss")
    assert (bad.exit_code, "unknown role" in bad.output) == (2, True)
    assert nightread(make_app, "users", "disable", "bob").exit_code == 0
    assert login(client, "bob", first).status_code == 401
    assert nightread(make_app, "users", "enable", "bob").exit_code == 0
    assert login(client, "bob", first).status_code == 303
    reset = nightread(make_app, "users", "reset-password", "bob", stdin=f"{second}\n{second}\n")
    assert reset.exit_code == 0
    assert first not in reset.output
    assert second not in reset.output
    short = nightread(make_app, "users", "reset-password", "bob", "--password-stdin", stdin="short\n")
    assert (short.exit_code, "at least 8" in short.output) == (2, True)
    assert nightread(make_app, "users", "unlock", "bob").exit_code == 0
    for command in (["enable", "nobody"], ["disable", "nobody"], ["set-role", "nobody", "viewer"]):
        r = nightread(make_app, "users", *command)
        assert (r.exit_code, "no user 'nobody'" in r.output) == (2, True), command
    by_bob = [(e["action"], e["detail"]) for e in events(make_app.engine) if e["subject"] == "bob"]
    assert [a for a, _ in by_bob] == [
        "user_added",
        "user_role_set",
        "user_disabled",
        "user_enabled",
        "user_password_reset",
        "user_unlocked",
    ]
    assert ("user_role_set", "viewer -> reviewer") in by_bob
    assert all(e["actor"].startswith("cli:") for e in events(make_app.engine) if e["subject"] == "bob")
    no_secret_in_audit(make_app.engine, first, second)
