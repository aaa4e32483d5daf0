"""review/routes/pages.py: the login form, the queue in both orders with its filters and counts, the study
view, decisions by form and by HTMX (the next item in place), what a viewer sees, logout; and that no
page carries what the Content-Security-Policy forbids. The browser tests drive the same pages in Chromium."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.exc import DatabaseError

from db import reviews
from db.migrate import upgrade
from db.session import make_engine, session_scope
from integrations.storage import LocalObjectStore
from review.app import ReviewConfig, create_app
from tests.review_seed import ORDER_CRITICAL, ORDER_UNCERTAIN, PASSWORD, TEXTS, seed
from tests.unit.review.support import TEMPLATES, csrf_of, login, queue_ids


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


def test_logout(env):
    _, _, app = env
    client = TestClient(app)
    login(client, "rita")
    token = csrf_of(client.get("/").text)
    assert client.post("/logout", data={"csrf_token": token}, follow_redirects=False).status_code == 303
    assert client.get("/", follow_redirects=False).status_code == 303


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
