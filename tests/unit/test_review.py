"""The review app in process (FastAPI's TestClient): auth, CSRF, roles, queue order and filters,
decisions (append-only), the API, the audit export, labels; and what keeps it safe on a hospital network:
login throttling and locks, sessions ended server-side, security headers, bounded parameters, the
audit log and its CSV, the `users` commands. The browser tests drive the same app in Chromium."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.exc import DatabaseError
from sqlmodel import select
from typer.testing import CliRunner

from db import reviews
from db.migrate import upgrade
from db.models import LoginThrottle, utcnow
from db.session import make_engine, session_scope
from flows.cli import app as cli
from integrations.storage import LocalObjectStore
from review.app import ReviewConfig, create_app
from tests.review_seed import CRITICAL, ORDER_CRITICAL, ORDER_UNCERTAIN, PASSWORD, TEXTS, seed, seeded_database

TEMPLATES = Path(__file__).resolve().parents[2] / "review" / "templates"


class Clock:
    """A clock the tests move forward (lock expiry) instead of sleeping."""

    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


@pytest.fixture
def make_app(tmp_path):
    """A seeded database and a factory of review apps over it (config overrides as keyword arguments)."""
    engine, store, seeded = seeded_database(tmp_path)
    clock = Clock()

    def make(**overrides):
        config = {"secret": "s" * 40, "critical_ids": CRITICAL, "question_texts": TEXTS, "page_size": 4, "clock": clock}
        return create_app(engine=engine, store=store, config=ReviewConfig(**(config | overrides)))

    make.engine, make.seeded, make.clock = engine, seeded, clock
    make.url = f"sqlite:///{tmp_path / 'seeded.db'}"
    yield make
    engine.dispose()


@pytest.fixture
def env(make_app):
    return make_app.engine, make_app.seeded, make_app()


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "the page carries a CSRF token"
    return match.group(1)


def login(client: TestClient, name: str, password: str = PASSWORD):
    token = csrf_of(client.get("/login").text)
    return client.post(
        "/login", data={"username": name, "password": password, "csrf_token": token}, follow_redirects=False
    )


def queue_ids(html: str) -> list[int]:
    return [int(x) for x in re.findall(r'<tr data-finding="(\d+)"', html)]


def test_every_page_but_login_needs_a_session(env):
    _, seeded, app = env
    client = TestClient(app)
    for path in ("/", f"/studies/{seeded.study_ids['cr']}", f"/images/{seeded.image_ids['cr']}", "/password"):
        r = client.get(path, follow_redirects=False)
        assert r.status_code == 303, path
        assert r.headers["location"] == "/login"
    assert client.get("/openapi.json").status_code == 401
    assert client.get("/login").status_code == 200


def test_wrong_password_and_unknown_user_are_refused_alike(env):
    _, _, app = env
    client = TestClient(app)
    for name, password in (("rita", "wrong password"), ("nobody", PASSWORD)):
        r = login(client, name, password)
        assert r.status_code == 401
        assert "Wrong user name or password." in r.text
    assert client.get("/", follow_redirects=False).status_code == 303


def test_login_form_without_csrf_token_is_refused(env):
    _, _, app = env
    client = TestClient(app)
    client.get("/login")
    r = client.post("/login", data={"username": "rita", "password": PASSWORD}, follow_redirects=False)
    assert r.status_code == 403


def test_session_cookie_is_http_only_and_same_site_strict(env):
    _, _, app = env
    client = TestClient(app)
    r = login(client, "rita")
    assert r.status_code == 303
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie
    assert "samesite=strict" in cookie


@pytest.mark.parametrize(("order", "expected"), [("critical", ORDER_CRITICAL), ("uncertain", ORDER_UNCERTAIN)])
def test_queue_order_flagged_first_then_the_chosen_priority(env, order, expected):
    _, seeded, app = env
    client = TestClient(app)
    login(client, "vic")
    by_id = {v: k for k, v in seeded.finding_ids.items()}
    ids = queue_ids(client.get(f"/?order={order}").text) + queue_ids(client.get(f"/?order={order}&page=2").text)
    assert [by_id[i] for i in ids] == expected
    assert "xr_impression" not in [by_id[i] for i in ids], "open answers have no probability to review"


def test_queue_filters_and_counts(env):
    _, seeded, app = env
    client = TestClient(app)
    login(client, "vic")
    page = client.get("/?modality=CT&state=any").text
    assert set(queue_ids(page)) == {seeded.finding_ids["ct_lung_nodule"], seeded.finding_ids["ct_fracture"]}
    assert queue_ids(client.get("/?question=cardiomegaly").text) == [seeded.finding_ids["cardiomegaly"]]
    assert len(queue_ids(client.get("/?date_from=2024-01-06&date_to=2024-01-06").text)) == 2
    assert len(queue_ids(client.get("/?flagged_only=1").text + client.get("/?flagged_only=1&page=2").text)) == 4
    assert queue_ids(client.get(f"/?model_version={seeded.model_version_id + 1}").text) == []
    assert "flagged <b>4</b>" in page
    assert "pending <b>6</b>" in page
    assert client.get("/?order=newest").status_code == 400
    assert client.get("/?date_from=yesterday").status_code == 400


def test_decisions_change_the_state_and_are_append_only(env):
    engine, seeded, app = env
    client = TestClient(app)
    login(client, "rita")
    page = client.get(f"/studies/{seeded.study_ids['cr']}?finding={seeded.finding_ids['pleural_effusion']}").text
    token = csrf_of(page)
    effusion, pneumothorax = seeded.finding_ids["pleural_effusion"], seeded.finding_ids["pneumothorax"]
    r = client.post(
        f"/findings/{effusion}/decision", data={"decision": "confirm", "csrf_token": token}, follow_redirects=False
    )
    assert r.status_code == 303
    assert r.headers["location"] == f"/studies/{seeded.study_ids['ct']}?finding={seeded.finding_ids['ct_lung_nodule']}"
    r = client.post(
        f"/findings/{pneumothorax}/decision",
        data={"decision": "correct", "to_answer": "no", "comment": "skin fold", "csrf_token": token},
        follow_redirects=False,
    )
    assert r.status_code == 303
    bad = client.post(
        f"/findings/{pneumothorax}/decision",
        data={"decision": "correct", "to_answer": "maybe", "csrf_token": token},
    )
    assert bad.status_code == 422
    assert "yes or no" in bad.text
    assert client.post(f"/findings/{pneumothorax}/decision", data={"decision": "reject"}).status_code == 403
    with session_scope(engine) as session:
        states = reviews.finding_states(session=session, finding_ids=[effusion, pneumothorax])
        assert states == {effusion: ("confirmed", None), pneumothorax: ("corrected", "no")}
        labels = reviews.labels(session=session)
        assert labels == {effusion: "yes", pneumothorax: "no"}
    counts = client.get("/").text
    assert "confirmed <b>1</b>" in counts
    assert "corrected <b>1</b>" in counts
    # the database itself refuses to change or delete a decision
    for statement in ("UPDATE review SET decision = 'reject'", "DELETE FROM review"):
        with pytest.raises(DatabaseError, match="append-only"), engine.begin() as conn:
            conn.execute(text(statement))


def test_htmx_decision_returns_the_next_item_without_a_reload(env):
    _, seeded, app = env
    client = TestClient(app)
    login(client, "rita")
    token = csrf_of(client.get("/").text)
    r = client.post(
        f"/findings/{seeded.finding_ids['pleural_effusion']}/decision",
        data={"decision": "confirm", "queue": "order=critical"},
        headers={"HX-Request": "true", "X-CSRF-Token": token},
    )
    assert r.status_code == 200
    assert r.headers["HX-Push-Url"] == (
        f"/studies/{seeded.study_ids['ct']}?finding={seeded.finding_ids['ct_lung_nodule']}&order=critical"
    )
    assert "<html" not in r.text, "a fragment for #main, not a page"
    assert f'data-current="{seeded.finding_ids["ct_lung_nodule"]}"' in r.text


def test_a_viewer_cannot_decide(env):
    _, seeded, app = env
    client = TestClient(app)
    login(client, "vic")
    page = client.get(f"/studies/{seeded.study_ids['cr']}").text
    assert 'form class="decision' not in page, "no decision forms for a viewer"
    r = client.post(
        f"/findings/{seeded.finding_ids['pleural_effusion']}/decision",
        data={"decision": "confirm", "csrf_token": csrf_of(page)},
    )
    assert r.status_code == 403


def test_study_page_shows_images_captions_probabilities_and_no_identifiers(env):
    _, seeded, app = env
    client = TestClient(app)
    login(client, "vic")
    page = client.get(f"/studies/{seeded.study_ids['cr']}").text
    assert "A CR image of the chest." in page
    assert "P(yes) 0.950" in page
    assert 'data-width="95.0"' in page, "review.js draws the bar: no inline style under the CSP"
    assert "1.2.826.0.1.3680043" not in page, "no UIDs on the page"
    assert "Doe" not in page
    png = client.get(f"/images/{seeded.image_ids['cr']}")
    assert png.headers["content-type"] == "image/png"
    assert png.content[:4] == b"\x89PNG"


def test_identifiers_only_when_the_setting_is_on(tmp_path):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    upgrade(url)
    engine = make_engine(url)
    seeded = seed(engine, LocalObjectStore(tmp_path / "o"), identities=True)
    for show in (False, True):
        app = create_app(
            engine=engine,
            store=LocalObjectStore(tmp_path / "o"),
            config=ReviewConfig(secret="s" * 40, show_patient_identifiers=show, question_texts=TEXTS),
        )
        client = TestClient(app)
        login(client, "vic")
        assert ("Doe^Jane" in client.get(f"/studies/{seeded.study_ids['cr']}").text) is show
    engine.dispose()


def test_api_needs_a_token_or_a_session(env):
    _, seeded, app = env
    client = TestClient(app)
    for method, path in (
        ("GET", "/api/queue"),
        ("GET", f"/api/studies/{seeded.study_ids['cr']}"),
        ("POST", f"/api/findings/{seeded.finding_ids['pneumothorax']}/decision"),
    ):
        assert client.request(method, path).status_code == 401, path
    assert client.post("/api/token", data={"username": "rita", "password": "nope nope"}).status_code == 401
    token = client.post("/api/token", data={"username": "rita", "password": PASSWORD}).json()["access_token"]
    auth = {"Authorization": f"Bearer {token}"}
    queue = client.get("/api/queue?order=uncertain&page=1", headers=auth).json()
    assert queue["total"] == 6
    assert queue["counts"]["flagged"] == 4
    assert [i["question_id"] for i in queue["items"]] == ORDER_UNCERTAIN[:4]
    study = client.get(f"/api/studies/{seeded.study_ids['cr']}", headers=auth).json()
    assert study["images"][0]["captions"][0]["text"] == "A CR image of the chest."
    assert "patient" not in study
    r = client.post(
        f"/api/findings/{seeded.finding_ids['pneumothorax']}/decision",
        json={"decision": "reject", "comment": "no pleural line"},
        headers=auth,
    )
    assert r.status_code == 201
    assert r.json()["review_state"] == "rejected"
    assert client.get("/api/queue", headers={"Authorization": "Bearer forged"}).status_code == 401
    viewer = client.post("/api/token", data={"username": "vic", "password": PASSWORD}).json()["access_token"]
    r = client.post(
        f"/api/findings/{seeded.finding_ids['pneumothorax']}/decision",
        json={"decision": "confirm"},
        headers={"Authorization": f"Bearer {viewer}"},
    )
    assert r.status_code == 403


def test_api_with_a_session_cookie_needs_the_csrf_header_to_write(env):
    _, seeded, app = env
    client = TestClient(app)
    login(client, "rita")
    url = f"/api/findings/{seeded.finding_ids['pneumothorax']}/decision"
    assert client.get("/api/queue").status_code == 200
    assert client.post(url, json={"decision": "confirm"}).status_code == 403
    token = csrf_of(client.get("/").text)
    assert client.post(url, json={"decision": "confirm"}, headers={"X-CSRF-Token": token}).status_code == 201


def test_openapi_documents_the_api(env):
    _, _, app = env
    client = TestClient(app)
    login(client, "vic")
    spec = client.get("/openapi.json").json()
    assert {"/api/token", "/api/queue", "/api/studies/{study_id}", "/api/findings/{finding_id}/decision"} <= set(
        spec["paths"]
    )


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


def test_logout(env):
    _, _, app = env
    client = TestClient(app)
    login(client, "rita")
    token = csrf_of(client.get("/").text)
    assert client.post("/logout", data={"csrf_token": token}, follow_redirects=False).status_code == 303
    assert client.get("/", follow_redirects=False).status_code == 303


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


def test_api_cohort(env):
    _, seeded, app = env
    client = TestClient(app)
    assert client.get("/api/cohort").status_code == 401
    token = client.post("/api/token", data={"username": "vic", "password": PASSWORD}).json()["access_token"]
    auth = {"Authorization": f"Bearer {token}"}
    r = client.get("/api/cohort", params={"where": "pleural_effusion >= 0.9", "per": "image"}, headers=auth)
    assert r.status_code == 200
    body = r.json()
    assert body["count"] == 1
    assert body["rows"][0]["url"] == f"/images/{seeded.image_ids['cr']}"
    assert "object_key" not in body["rows"][0]
    bad = client.get("/api/cohort", params={"where": "nonsense >= 2"}, headers=auth)
    assert bad.status_code == 400
    assert "unknown question" in bad.json()["detail"]


# --- safe on a hospital network ---------------------------------------------------------------------------


def nightread(make_app, *args: str, stdin: str | None = None):
    """The `nightread` command line in process, on the test's database (the process umask it sets for
    its files is put back afterwards)."""
    umask = os.umask(0o022)
    os.umask(umask)
    try:
        return CliRunner().invoke(
            cli, list(args), input=stdin, env={"NIGHTREAD_DATABASE__URL": make_app.url}, catch_exceptions=False
        )
    finally:
        os.umask(umask)


def events(engine, action: str | None = None) -> list[dict]:
    with session_scope(engine) as session:
        rows = reviews.audit_events(session=session)
    return [r for r in rows if action is None or r["action"] == action]


def no_secret_in_audit(engine, *secrets: str) -> None:
    cells = [str(v) for row in events(engine) for v in row.values()]
    for secret in secrets:
        assert not any(secret in cell for cell in cells), f"{secret!r} is in the audit log"


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


def test_pages_carry_no_inline_script_handlers_or_styles(env):
    """What the CSP forbids is not in the pages: every script is a file, no on* handler, no style attribute."""
    _, seeded, app = env
    client = TestClient(app)
    pages = [client.get("/login").text]
    login(client, "rita")
    pages += [client.get(p).text for p in ("/", f"/studies/{seeded.study_ids['cr']}", "/password")]
    pages.append(client.get(f"/studies/{seeded.study_ids['ct']}", headers={"HX-Request": "true"}).text)
    pages += [t.read_text() for t in TEMPLATES.glob("*.html")]
    for html in pages:
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), "an inline <script>"
        assert not re.search(r"\son[a-z]+\s*=", html, re.IGNORECASE), "an inline event handler"
        assert not re.search(r"\sstyle\s*=", html, re.IGNORECASE), "an inline style"
        assert "javascript:" not in html


def test_api_docs_are_off_by_default_and_the_schema_is_behind_login(make_app, tmp_path):
    app = make_app()
    client = TestClient(app)
    assert client.get("/openapi.json").status_code == 401
    login(client, "vic")
    for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        assert client.get(path).status_code == 404, path
    assert "/api/queue" in client.get("/openapi.json").json()["paths"]
    token = client.post("/api/token", data={"username": "vic", "password": PASSWORD}).json()["access_token"]
    bearer = TestClient(app).get("/openapi.json", headers={"Authorization": f"Bearer {token}"})
    assert bearer.status_code == 200
    with pytest.raises(ValueError, match="api_docs_assets"):
        make_app(api_docs=True)


def test_api_docs_when_enabled_come_from_local_files_only(make_app, tmp_path):
    assets = tmp_path / "swagger-ui-dist"
    assets.mkdir()
    (assets / "swagger-ui-bundle.js").write_text("window.SwaggerUIBundle = function () {};\n")
    (assets / "swagger-ui.css").write_text("body { margin: 0; }\n")
    client = TestClient(make_app(api_docs=True, api_docs_assets=assets))
    assert client.get("/docs", follow_redirects=False).status_code == 303
    login(client, "vic")
    page = client.get("/docs")
    assert page.status_code == 200
    urls = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sorted(urls) == ["/docs-assets/swagger-ui-bundle.js", "/docs-assets/swagger-ui.css", "/static/review.js"]
    assert len(re.findall(r'integrity="sha384-[A-Za-z0-9+/=]{64}"', page.text)) == 2
    assert "SwaggerUIBundle = function" in client.get("/docs-assets/swagger-ui-bundle.js").text
    assert "script-src 'self'" in page.headers["content-security-policy"]


HUGE = "99999999999999999999"


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


def test_the_audit_log_is_append_only(env):
    engine, _, app = env
    login(TestClient(app), "vic")
    assert events(engine, "login_ok")
    for statement in ("UPDATE audit_event SET actor = 'someone else'", "DELETE FROM audit_event"):
        with pytest.raises(DatabaseError, match="append-only"), engine.begin() as conn:
            conn.execute(text(statement))
