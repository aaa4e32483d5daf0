"""The review queue, decisions, labels and cohort expressions on Postgres (the unit tests run them on
SQLite): the same SQL must give the same answers on both. Also the login throttle, server-side sessions
and the append-only audit log."""

from __future__ import annotations

import re
import threading

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.exc import DatabaseError

from db import reviews
from db.models import LoginThrottle, utcnow
from db.session import session_scope
from flows.cohort_export import cohort
from review.app import ReviewConfig, create_app
from tests.review_seed import CRITICAL, ORDER_CRITICAL, ORDER_UNCERTAIN, PASSWORD, TEXTS, seeded_database

pytestmark = pytest.mark.integration


def test_queue_decisions_and_cohorts_on_postgres(postgres_url, tmp_path):
    engine, _, seeded = seeded_database(tmp_path, postgres_url)
    by_id = {v: k for k, v in seeded.finding_ids.items()}
    with session_scope(engine) as session:
        for order, expected in (("critical", ORDER_CRITICAL), ("uncertain", ORDER_UNCERTAIN)):
            items, total = reviews.queue(
                session=session, flt=reviews.QueueFilter(), order=order, critical_ids=CRITICAL, limit=10
            )
            assert [by_id[i.finding_id] for i in items] == expected
            assert total == 6
        rita = reviews.get_user(session=session, name="rita")
        assert rita is not None
        reviews.decide(
            session=session,
            user=rita,
            finding_id=seeded.finding_ids["pneumothorax"],
            decision="correct",
            to_answer="no",
        )
        reviews.decide(session=session, user=rita, finding_id=seeded.finding_ids["ct_lung_nodule"], decision="reject")
        reviews.decide(
            session=session, user=rita, finding_id=seeded.finding_ids["ct_lung_nodule"], decision="comment", comment="x"
        )
    with session_scope(engine) as session:
        assert reviews.queue_counts(session=session)["pending"] == 4
        assert reviews.labels(session=session) == {
            seeded.finding_ids["pneumothorax"]: "no",
            seeded.finding_ids["ct_lung_nodule"]: "no",
        }

    def studies(where: str) -> set[int]:
        return {r["study_id"] for r in cohort(engine, where, known_questions=list(TEXTS)).rows}

    cr, ct = seeded.study_ids["cr"], seeded.study_ids["ct"]
    assert studies("pleural_effusion >= 0.8 and pneumothorax = no") == {cr}
    assert studies("ct_lung_nodule = no and review(ct_lung_nodule) = rejected") == {ct}
    assert studies("review(ct_fracture) = pending and modality in (CT) and study_date >= 2024-01-06") == {ct}
    assert studies("not pneumothorax") == {ct}
    engine.dispose()


def _login(client: TestClient, name: str, password: str = PASSWORD) -> int:
    page = client.get("/login").text
    match = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert match
    data = {"username": name, "password": password, "csrf_token": match.group(1)}
    return client.post("/login", data=data, follow_redirects=False).status_code


def test_login_lock_sessions_and_the_audit_log_on_postgres(postgres_url, tmp_path):
    engine, store, _ = seeded_database(tmp_path, postgres_url)
    app = create_app(engine=engine, store=store, config=ReviewConfig(secret="s" * 40, question_texts=TEXTS))
    client = TestClient(app)
    assert [_login(client, "rita", "wrong password") for _ in range(6)] == [401] * 4 + [429] * 2
    assert _login(client, "rita") == 429
    with session_scope(engine) as session:
        assert reviews.unlock(session=session, keys=[reviews.user_throttle_key("rita")]) == 2
    assert _login(client, "rita") == 303
    thief = TestClient(app, cookies=dict(client.cookies))
    assert thief.get("/api/queue").status_code == 200
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/").text)
    assert csrf
    client.post("/logout", data={"csrf_token": csrf.group(1)})
    assert thief.get("/api/queue").status_code == 401
    with session_scope(engine) as session:
        actions = [e["action"] for e in reviews.audit_events(session=session)]
    assert actions.count("login_failed") == 5
    assert {"login_locked", "login_refused", "login_ok", "logout"} <= set(actions)
    # the database itself refuses to change, delete or truncate the audit log
    for statement in (
        "UPDATE audit_event SET actor = 'someone else'",
        "DELETE FROM audit_event",
        "TRUNCATE audit_event",
    ):
        with pytest.raises(DatabaseError, match="append-only"), engine.begin() as conn:
            conn.execute(text(statement))
    engine.dispose()


def test_concurrent_failures_are_all_counted_on_postgres(postgres_url, tmp_path):
    """Simultaneous first failures of one name neither collide (upsert) nor get lost (row lock)."""
    engine, _, _ = seeded_database(tmp_path, postgres_url)
    policy = reviews.LoginPolicy(max_failures_per_user=1000)
    start = threading.Barrier(8)
    errors: list[BaseException] = []

    def fail_once() -> None:
        try:
            start.wait(timeout=30)
            with session_scope(engine) as session:
                reviews.note_failure(session=session, key="user:rita", limit=1000, policy=policy, now=utcnow())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=fail_once) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    with session_scope(engine) as session:
        row = session.get(LoginThrottle, "user:rita")
        assert row is not None
        assert row.failures == 8
    engine.dispose()
