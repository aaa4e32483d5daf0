"""review/hooks.py: `ReviewConfig.on_study_decided(study_id)` runs after the response once a verdict
leaves no flagged finding of the study undecided (by form, HTMX or API alike), never before and never
for a comment; a failing hook is logged without its message and the decision stands."""

from __future__ import annotations

import logging

from fastapi.testclient import TestClient

from db import reviews
from db.session import session_scope
from tests.review_seed import PASSWORD
from tests.unit.review.support import csrf_of, login


class Recorder:
    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, study_id: int) -> None:
        self.calls.append(study_id)


def test_called_when_the_last_flag_of_a_study_is_decided_not_before(make_app):
    """CR has three flags (effusion, pneumothorax, cardiomegaly) and an unflagged finding; CT one flag."""
    hook = Recorder()
    client = TestClient(make_app(on_study_decided=hook))
    login(client, "rita")
    csrf = csrf_of(client.get("/").text)
    f, cr, ct = make_app.seeded.finding_ids, make_app.seeded.study_ids["cr"], make_app.seeded.study_ids["ct"]
    token = client.post("/api/token", data={"username": "rita", "password": PASSWORD}).json()["access_token"]

    def form(question: str, **data: str) -> int:
        r = client.post(f"/findings/{f[question]}/decision", data=data | {"csrf_token": csrf}, follow_redirects=False)
        return r.status_code

    def htmx(question: str, **data: str) -> int:
        r = client.post(
            f"/findings/{f[question]}/decision", data=data, headers={"HX-Request": "1", "X-CSRF-Token": csrf}
        )
        return r.status_code

    def api(question: str, **body: str) -> int:
        r = client.post(
            f"/api/findings/{f[question]}/decision", json=body, headers={"Authorization": f"Bearer {token}"}
        )
        return r.status_code

    assert form("consolidation", decision="confirm") == 303
    assert form("pleural_effusion", decision="confirm") == 303
    assert api("pneumothorax", decision="correct", to_answer="no") == 201
    assert htmx("cardiomegaly", decision="comment", comment="borderline") == 200
    assert form("cardiomegaly", decision="correct", to_answer="maybe") == 422, "refused: nothing decided"
    assert hook.calls == [], "a flag of CR is still undecided (a comment or a refusal decides nothing)"
    assert htmx("cardiomegaly", decision="reject") == 200
    assert hook.calls == [cr], "the last flag of CR"
    assert api("ct_fracture", decision="confirm") == 201
    assert hook.calls == [cr], "CT's flag is still undecided"
    assert api("ct_lung_nodule", decision="confirm") == 201
    assert hook.calls == [cr, ct]
    assert api("pneumothorax", decision="comment", comment="seen again") == 201
    assert hook.calls == [cr, ct], "a comment changes no verdict"
    assert form("pneumothorax", decision="confirm") == 303
    assert hook.calls == [cr, ct, cr], "a changed verdict on a fully decided study: called again"


def test_a_failing_hook_is_logged_without_its_message_and_the_decision_stands(make_app, caplog):
    def broken(study_id: int) -> None:
        raise RuntimeError("Doe^Jane 1.2.826.0.1.3680043")  # what a hook's message might carry

    client = TestClient(make_app(on_study_decided=broken))
    token = client.post("/api/token", data={"username": "rita", "password": PASSWORD}).json()["access_token"]
    nodule, ct = make_app.seeded.finding_ids["ct_lung_nodule"], make_app.seeded.study_ids["ct"]
    with caplog.at_level(logging.ERROR, logger="review.hooks"):
        r = client.post(
            f"/api/findings/{nodule}/decision",
            json={"decision": "confirm"},
            headers={"Authorization": f"Bearer {token}"},
        )
    assert r.status_code == 201
    assert r.json()["review_state"] == "confirmed"
    assert [m.getMessage() for m in caplog.records] == [f"on_study_decided failed for study {ct}: RuntimeError"]
    assert "Doe" not in caplog.text
    assert "1.2.826" not in caplog.text
    with session_scope(make_app.engine) as session:
        assert reviews.finding_states(session=session, finding_ids=[nodule])[nodule] == ("confirmed", None)
