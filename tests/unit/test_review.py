"""The review app in process (FastAPI's TestClient): auth, CSRF, roles, queue order and filters,
decisions (append-only), the API, the audit export, labels. The browser tests drive the same app in
Chromium."""

from __future__ import annotations

import csv
import io
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
from tests.review_seed import CRITICAL, ORDER_CRITICAL, ORDER_UNCERTAIN, PASSWORD, TEXTS, seed, seeded_database


@pytest.fixture
def env(tmp_path):
    engine, store, seeded = seeded_database(tmp_path)
    app = create_app(
        engine=engine,
        store=store,
        config=ReviewConfig(secret="s" * 40, critical_ids=CRITICAL, question_texts=TEXTS, page_size=4),
    )
    yield engine, seeded, app
    engine.dispose()


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
    for path in ("/", f"/studies/{seeded.study_ids['cr']}", f"/images/{seeded.image_ids['cr']}", "/docs"):
        r = client.get(path, follow_redirects=False)
        assert r.status_code == 303, path
        assert r.headers["location"] == "/login"
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
    assert client.get("/?order=newest").status_code == 422
    assert client.get("/?date_from=yesterday").status_code == 422


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
    assert 'style="width: 95.0%"' in page
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
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
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
    assert bad.status_code == 422
    assert "unknown question" in bad.json()["detail"]
