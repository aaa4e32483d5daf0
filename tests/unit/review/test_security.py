"""What keeps the review app safe on a hospital network (docs/review-security.md): login throttling and
locks, sessions ended server-side, password changes and resets, security headers on every response,
bounded parameters and cohort expressions, the append-only audit log."""

from __future__ import annotations

import json
import re

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.exc import DatabaseError
from sqlmodel import select

from db import reviews
from db.models import LoginThrottle
from db.session import session_scope
from tests.review_seed import PASSWORD
from tests.unit.review.support import HUGE, csrf_of, events, login, nightread, no_secret_in_audit


def test_disabled_user_loses_session_and_token(env):
    engine, _, app = env
    client = TestClient(app)
    login(client, "rita")
    token = client.post("/api/token", data={"username": "rita", "password": PASSWORD}).json()["access_token"]
    with session_scope(engine) as session:
        reviews.disable_user(session=session, name="rita")
    assert client.get("/", follow_redirects=False).status_code == 303
    assert client.get("/api/queue", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    assert login(client, "rita").status_code == 401
    with session_scope(engine) as session:
        reviews.enable_user(session=session, name="rita", actor="test")
    assert login(client, "rita").status_code == 303
    assert client.get("/api/queue", headers={"Authorization": f"Bearer {token}"}).status_code == 401, (
        "a token from before the disable stays revoked"
    )


def test_failed_logins_lock_the_user_until_an_admin_unlocks(make_app):
    """200 wrong passwords, then the right one: refused (locked after 5) until `nightread users unlock`."""
    app = make_app()
    client = TestClient(app)
    token = csrf_of(client.get("/login").text)
    statuses = []
    for i in range(200):
        r = client.post(
            "/login",
            data={"username": "rita", "password": f"guess number {i:03d}", "csrf_token": token},
            follow_redirects=False,
        )
        statuses.append(r.status_code)
    assert statuses == [401] * 4 + [429] * 196
    r = login(client, "rita")  # the right password, while locked
    assert r.status_code == 429
    assert "Too many failed logins" in r.text
    assert 0 < int(r.headers["retry-after"]) <= 900
    assert client.post("/api/token", data={"username": "rita", "password": PASSWORD}).status_code == 429
    assert client.get("/", follow_redirects=False).status_code == 303
    # audited: each failure, the lock, the first refused attempt; never a password
    failed = events(make_app.engine, "login_failed")
    assert [(e["actor"], e["client"], e["detail"]) for e in failed] == [
        ("rita", "testclient", "wrong password (page)")
    ] * 5
    assert len(events(make_app.engine, "login_locked")) == 1
    assert len(events(make_app.engine, "login_refused")) == 1, "refusals during a lock are counted, not each logged"
    no_secret_in_audit(make_app.engine, "guess number", PASSWORD)
    listed = nightread(make_app, "users", "list", "--json")
    assert next(u for u in json.loads(listed.stdout) if u["name"] == "rita")["locked_until"]
    # an administrator lifts the lock
    unlocked = nightread(make_app, "users", "unlock", "rita")
    assert unlocked.exit_code == 0, unlocked.output
    assert "197 attempt(s) refused" in unlocked.output
    assert login(client, "rita").status_code == 303
    assert [e["actor"] for e in events(make_app.engine, "login_ok")] == ["rita"]
    assert events(make_app.engine, "user_unlocked")[0]["actor"].startswith("cli:")
    assert nightread(make_app, "users", "unlock", "nobody").exit_code == 2


def test_a_lock_ends_by_itself_and_doubles_when_failures_go_on(make_app):
    clock = make_app.clock
    client = TestClient(make_app())
    for _ in range(5):
        login(client, "rita", "wrong password")
    assert login(client, "rita").status_code == 429
    clock.advance(901)
    for _ in range(5):
        login(client, "rita", "wrong password")
    r = login(client, "rita")
    assert r.status_code == 429
    assert int(r.headers["retry-after"]) == 1800, "the second lock in a row lasts twice as long"
    clock.advance(1801)
    assert login(client, "rita").status_code == 303
    token = csrf_of(client.get("/").text)
    client.post("/logout", data={"csrf_token": token})
    for _ in range(5):
        login(client, "rita", "wrong password")
    assert int(login(client, "rita").headers["retry-after"]) == 900, "a successful login resets the doubling"


def test_unknown_user_names_are_locked_like_real_ones_and_never_logged(make_app):
    client = TestClient(make_app())
    statuses = [login(client, "nobody", "whatever it is").status_code for _ in range(6)]
    assert statuses == [401] * 4 + [429] * 2, "the same answers as for a real user: no user enumeration"
    # a password typed into the user name field is not written anywhere readable
    login(client, PASSWORD, PASSWORD)
    failed = events(make_app.engine, "login_failed")
    assert all(re.fullmatch(r"unknown#[0-9a-f]{12}", e["actor"]) for e in failed)
    assert failed[0]["detail"] == "unknown user (page)"
    no_secret_in_audit(make_app.engine, "nobody", PASSWORD, "whatever it is")


def test_failures_are_forgotten_after_a_quiet_day(make_app):
    client = TestClient(make_app())
    login(client, "ghost", "wrong password")
    make_app.clock.advance(25 * 3600)
    login(client, "rita", "wrong password")
    with session_scope(make_app.engine) as session:
        keys = sorted(r.key for r in session.exec(select(LoginThrottle)).all())
    assert keys == ["addr:testclient", "user:rita"], "the ghost name's row is gone"


def test_failures_from_one_address_lock_the_address(make_app):
    app = make_app(login_max_failures_per_address=6)
    client = TestClient(app)
    for i in range(6):
        login(client, f"name{i}", "wrong password")
    assert login(client, "vic").status_code == 429, "a right password from a locked address is refused"
    other = TestClient(app, client=("10.1.2.3", 50000))
    assert login(other, "vic").status_code == 303, "another address is not affected"
    assert [e["detail"] for e in events(make_app.engine, "login_locked")] == [
        "the client address is locked for 900 s after 6 failed logins"
    ]
    assert nightread(make_app, "users", "unlock", "--address", "testclient").exit_code == 0
    assert login(client, "vic").status_code == 303


def test_logout_ends_the_session_server_side(env):
    """A cookie copied before logout no longer reads or decides: pages, HTMX and /api alike."""
    engine, seeded, app = env
    client = TestClient(app)
    login(client, "rita")
    copied = dict(client.cookies)
    study = f"/studies/{seeded.study_ids['cr']}"
    thief = TestClient(app, cookies=copied)
    page = thief.get(study)
    assert page.status_code == 200, "the copied cookie works while the session lives"
    csrf = csrf_of(page.text)
    client.post("/logout", data={"csrf_token": csrf_of(client.get("/").text)})
    assert thief.get("/", follow_redirects=False).status_code == 303
    htmx = thief.get(study, headers={"HX-Request": "true"})
    assert (htmx.status_code, htmx.headers["HX-Redirect"]) == (401, "/login")
    assert thief.get("/api/queue").status_code == 401
    finding = seeded.finding_ids["pleural_effusion"]
    r = thief.post(f"/findings/{finding}/decision", data={"decision": "confirm", "csrf_token": csrf})
    assert r.url.path == "/login", "sent to the login page, nothing decided"
    r = thief.post(f"/api/findings/{finding}/decision", json={"decision": "confirm"}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 401
    with session_scope(engine) as session:
        assert reviews.finding_states(session=session, finding_ids=[finding])[finding] == ("pending", None)
    assert [e["actor"] for e in events(engine, "logout")] == ["rita"]


def test_a_session_expires_on_the_server(make_app):
    client = TestClient(make_app())
    login(client, "vic")
    assert client.get("/", follow_redirects=False).status_code == 200
    make_app.clock.advance(8 * 3600 + 1)
    assert client.get("/", follow_redirects=False).status_code == 303


def test_a_password_reset_ends_sessions_and_revokes_tokens(make_app):
    client = TestClient(make_app())
    login(client, "rita")
    token = client.post("/api/token", data={"username": "rita", "password": PASSWORD}).json()["access_token"]
    bearer = {"Authorization": f"Bearer {token}"}
    assert client.get("/api/queue", headers=bearer).status_code == 200
    new = "a brand new passphrase"
    r = nightread(make_app, "users", "reset-password", "rita", stdin=f"{new}\n{new}\n")
    assert r.exit_code == 0, r.output
    assert new not in r.output, "the prompt does not echo"
    assert client.get("/", follow_redirects=False).status_code == 303
    assert client.get("/api/queue", headers=bearer).status_code == 401
    assert login(client, "rita").status_code == 401
    assert login(client, "rita", new).status_code == 303
    reset = events(make_app.engine, "user_password_reset")
    assert reset[0]["subject"] == "rita"
    assert reset[0]["detail"].startswith("1 session(s) ended, API tokens revoked")
    no_secret_in_audit(make_app.engine, new, PASSWORD)


def test_changing_ones_password_ends_the_other_sessions(make_app):
    app = make_app()
    here, elsewhere = TestClient(app), TestClient(app)
    login(here, "rita")
    login(elsewhere, "rita")
    token = here.post("/api/token", data={"username": "rita", "password": PASSWORD}).json()["access_token"]
    csrf = csrf_of(here.get("/password").text)
    new = "another long passphrase"

    def change(current: str, new_password: str, repeat: str):
        return here.post(
            "/password", data={"current": current, "new": new_password, "repeat": repeat, "csrf_token": csrf}
        )

    assert change(PASSWORD, new, "something else").status_code == 400
    short = change(PASSWORD, "short", "short")
    assert (short.status_code, "at least 8" in short.text) == (400, True)
    wrong = change("not my password", new, new)
    assert (wrong.status_code, "current password is wrong" in wrong.text) == (401, True)
    done = change(PASSWORD, new, new)
    assert done.status_code == 200
    assert "Password changed" in done.text
    assert here.get("/", follow_redirects=False).status_code == 200, "this browser stays signed in"
    assert elsewhere.get("/", follow_redirects=False).status_code == 303
    assert here.get("/api/queue", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    assert login(TestClient(app), "rita", new).status_code == 303
    assert [e["actor"] for e in events(make_app.engine, "password_changed")] == ["rita"]
    assert events(make_app.engine, "login_failed")[0]["detail"] == "wrong password (password change)"
    no_secret_in_audit(make_app.engine, new, PASSWORD, "not my password")


SECURITY_HEADERS = {
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


def test_security_headers_on_every_response(env):
    _, seeded, app = env
    client = TestClient(app)
    login(client, "vic")
    for path in ("/login", "/", f"/studies/{seeded.study_ids['cr']}", "/static/review.js", "/nope", "/healthz"):
        r = client.get(path)
        for name, value in SECURITY_HEADERS.items():
            assert r.headers.get(name) == value, (path, name)
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp
        assert "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp
        assert "unsafe-eval" not in csp
        assert "strict-transport-security" not in r.headers, "no HSTS over plain http"
    assert TestClient(app).get("/api/queue").headers["x-frame-options"] == "DENY", "401s too"
    assert client.get("/").headers["cache-control"] == "no-store"
    assert "no-store" not in client.get("/static/review.css").headers.get("cache-control", "")
    tls = TestClient(app, base_url="https://testserver")
    assert tls.get("/login").headers["strict-transport-security"].startswith("max-age=31536000")


def test_out_of_range_pages_and_ids_are_a_400_naming_the_parameter(env):
    _, seeded, app = env
    client = TestClient(app)
    login(client, "rita")
    for url, name in (
        (f"/?page={HUGE}", "page"),
        ("/?page=0", "page"),
        (f"/api/queue?page={HUGE}", "page"),
        ("/api/queue?page_size=100000", "page_size"),
        ("/api/queue?page_size=0", "page_size"),
        (f"/studies/{HUGE}", "study_id"),
        (f"/studies/{seeded.study_ids['cr']}?finding={HUGE}", "finding"),
        (f"/images/{HUGE}", "image_id"),
        (f"/api/studies/{HUGE}", "study_id"),
        (f"/api/queue?model_version={HUGE}", "model_version"),
        (f"/api/cohort?model_version={HUGE}", "model_version"),
        (f"/?model_version={HUGE}", "model_version"),
    ):
        r = client.get(url)
        assert r.status_code == 400, url
        assert name in r.json()["detail"], (url, r.json())
    r = client.post(
        f"/findings/{seeded.finding_ids['pneumothorax']}/decision",
        data={"decision": "confirm", "queue": f"model_version={HUGE}", "csrf_token": csrf_of(client.get("/").text)},
    )
    assert r.status_code == 400
    assert "model_version" in r.json()["detail"]
    assert len(client.get("/api/queue?page_size=2").json()["items"]) == 2
    assert client.get("/?page=50").status_code == 200, "a page past the end is empty, not an error"


def test_cohort_expressions_are_bounded(env):
    _, _, app = env
    client = TestClient(app)
    login(client, "vic")

    def detail(where: str) -> str:
        r = client.get("/api/cohort", params={"where": where})
        assert r.status_code == 400, where[:40]
        return str(r.json()["detail"])

    assert "deeper than 20 levels" in detail("(" * 25 + "pneumothorax" + ")" * 25)
    assert "deeper than 20 levels" in detail("not " * 400 + "pneumothorax")
    assert "at most 2000" in detail("(" * 999 + "pneumothorax" + ")" * 999)
    assert "more than 50 terms" in detail(" or ".join(["pneumothorax"] * 60))
    assert "whole number" in detail(f"model_version = {HUGE}")
    ok = client.get("/api/cohort", params={"where": "((pneumothorax >= 0.5)) and not not pleural_effusion"})
    assert ok.status_code == 200
    assert [e["actor"] for e in events(env[0], "cohort_exported")] == ["vic"]


def test_the_audit_log_is_append_only(env):
    engine, _, app = env
    login(TestClient(app), "vic")
    assert events(engine, "login_ok")
    for statement in ("UPDATE audit_event SET actor = 'someone else'", "DELETE FROM audit_event"):
        with pytest.raises(DatabaseError, match="append-only"), engine.begin() as conn:
            conn.execute(text(statement))
