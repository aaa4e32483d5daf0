"""The review queue, decisions, labels and cohort expressions on Postgres (the unit tests run them on
SQLite): the same SQL must give the same answers on both."""

from __future__ import annotations

import pytest

from db import reviews
from db.session import session_scope
from flows.cohort import cohort
from tests.review_seed import CRITICAL, ORDER_CRITICAL, ORDER_UNCERTAIN, TEXTS, seeded_database

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
