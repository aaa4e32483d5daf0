"""review/routes/api.py and review/models.py: the JSON API needs a token or a session (and the CSRF header
for a cookie write), its JSON is what /openapi.json documents, refusals map to their status, the cohort
route, and the schema and Swagger UI behind a login."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from db import reviews
from db.models import StudyIdentity
from db.session import session_scope
from tests.review_seed import ORDER_UNCERTAIN, PASSWORD
from tests.unit.review.support import csrf_of, login


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


def _bearer(client: TestClient, name: str) -> dict[str, str]:
    token = client.post("/api/token", data={"username": name, "password": PASSWORD}).json()["access_token"]
    return {"Authorization": f"Bearer {token}"}


def test_the_json_is_what_the_openapi_schema_documents(make_app):
    """Every /api answer validates against its response schema in /openapi.json, and the schemas allow no
    undocumented field (additionalProperties false): the schema is the JSON's documentation."""
    jsonschema = pytest.importorskip("jsonschema")
    seeded = make_app.seeded
    with session_scope(make_app.engine) as session:
        session.add(StudyIdentity(study_id=seeded.study_ids["ct"], patient_name="Doe^John", patient_id="P2"))
    app = make_app(show_patient_identifiers=True)
    client = TestClient(app)
    auth = _bearer(client, "rita")
    spec = client.get("/openapi.json", headers=auth).json()

    def check(method: str, route: str, url: str, status: int, **kwargs) -> dict:
        r = client.request(method, url, headers=auth, **kwargs)
        assert r.status_code == status, (url, r.text)
        content = spec["paths"][route][method.lower()]["responses"][str(status)]["content"]["application/json"]
        schema = {**content["schema"], "components": spec["components"]}
        jsonschema.Draft202012Validator(schema).validate(r.json())
        return r.json()

    token = client.post("/api/token", data={"username": "vic", "password": PASSWORD})
    content = spec["paths"]["/api/token"]["post"]["responses"]["200"]["content"]["application/json"]
    jsonschema.Draft202012Validator({**content["schema"], "components": spec["components"]}).validate(token.json())
    check("GET", "/api/queue", "/api/queue?state=any&page_size=10", 200)
    cr = check("GET", "/api/studies/{study_id}", f"/api/studies/{seeded.study_ids['cr']}", 200)
    ct = check("GET", "/api/studies/{study_id}", f"/api/studies/{seeded.study_ids['ct']}", 200)
    assert "patient" not in cr, "no identity kept for this study: no key at all"
    assert ct["patient"] == {"name": "Doe^John", "id": "P2", "accession_number": None}
    decision = f"/api/findings/{seeded.finding_ids['pneumothorax']}/decision"
    route = "/api/findings/{finding_id}/decision"
    body = check("POST", route, decision, 201, json={"decision": "correct", "to_answer": "no"})
    assert body["review_state"] == "corrected"
    assert body["corrected_answer"] == "no"
    check("POST", route, "/api/findings/987654/decision", 404, json={"decision": "confirm"})
    for per in ("study", "image"):
        check("GET", "/api/cohort", f"/api/cohort?per={per}&where=pleural_effusion%20%3E%3D%200.5", 200)
    names = {s["$ref"].rsplit("/", 1)[-1] for s in _response_schemas(spec)}
    assert {"Token", "QueuePage", "StudyPublic", "DecisionRecorded", "CohortPublic"} <= names


def _response_schemas(spec: dict) -> list[dict]:
    return [
        response["content"]["application/json"]["schema"]
        for path in spec["paths"].values()
        for operation in path.values()
        for code, response in operation["responses"].items()
        if code.startswith("2")
    ]


def test_refusals_map_to_their_status(env):
    """db.reviews' refusals by kind: not allowed 403, no such finding 404, a decision not recordable 422;
    each with the reason as `detail`."""
    _, seeded, app = env
    client = TestClient(app)
    rita, vic = _bearer(client, "rita"), _bearer(client, "vic")
    url = f"/api/findings/{seeded.finding_ids['pneumothorax']}/decision"
    cases = [
        (vic, url, {"decision": "confirm"}, 403, "may not decide"),
        (rita, "/api/findings/987654/decision", {"decision": "confirm"}, 404, "no finding 987654"),
        (rita, url, {"decision": "maybe"}, 422, "unknown decision 'maybe'"),
        (rita, url, {"decision": "correct"}, 422, "needs the corrected answer"),
        (rita, url, {"decision": "comment", "comment": "  "}, 422, "a comment needs text"),
    ]
    for auth, target, body, status, reason in cases:
        r = client.post(target, json=body, headers=auth)
        assert (r.status_code, reason in r.json()["detail"]) == (status, True), (body, r.text)
    with session_scope(env[0]) as session:
        finding = seeded.finding_ids["pneumothorax"]
        assert reviews.finding_states(session=session, finding_ids=[finding])[finding] == ("pending", None)


def test_totals_and_counts_stop_at_the_count_limit(env, monkeypatch):
    """Past COUNT_LIMIT findings (beyond the page asked for) the queue is not counted to its end: the API
    says `more`, the page prints "N+" and still offers the next page."""
    import review.routes.api as api_routes
    import review.views as views

    _, _, app = env
    client = TestClient(app)
    assert login(client, "rita").status_code == 303
    headers = {"X-CSRF-Token": "unused"}  # reads need no CSRF header
    exact = client.get("/api/queue?page_size=2", headers=headers).json()
    assert (exact["total"], exact["more"], exact["pages"]) == (6, False, 3)
    assert exact["counts"]["counted_to"] == views.COUNT_LIMIT
    monkeypatch.setattr(views, "COUNT_LIMIT", 1)
    monkeypatch.setattr(api_routes, "COUNT_LIMIT", 1)
    capped = client.get("/api/queue?page_size=2", headers=headers).json()
    assert (capped["total"], capped["more"], capped["pages"]) == (3, True, 2), "counted to the page and 1 past it"
    assert capped["counts"]["flagged"] == 2, "one past the limit: more than 1"
    assert capped["counts"]["counted_to"] == 1
    assert [i["finding_id"] for i in capped["items"]] == [i["finding_id"] for i in exact["items"]]
    last = client.get("/api/queue?page_size=2&page=3", headers=headers).json()
    assert (last["total"], last["more"]) == (6, False), "deeper pages count further"
    html = client.get("/").text  # the page's size is 4 here: counted to 5
    assert "<b>1+</b>" in html
    assert "5+ finding(s) &middot; page 1 of 2+" in html
    assert 'id="next-page"' in html
