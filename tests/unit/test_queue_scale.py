"""The review queue read in index order (db/reviews.py, migration 0013): pages that cross its segments, and
totals and counts counted up to a limit, agree with the exact answers on SQLite and Postgres."""

from __future__ import annotations

import pytest

from db import reviews
from db.session import session_scope
from tests.review_seed import CRITICAL, ORDER_CRITICAL, ORDER_UNCERTAIN, seeded_database

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.integration)]


@pytest.fixture(params=BACKENDS)
def seeded(request, tmp_path):
    url = None if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    engine, _, data = seeded_database(tmp_path, url)
    yield engine, data
    engine.dispose()


def test_every_page_of_the_queue_in_order_across_its_segments(seeded):
    engine, data = seeded
    by_id = {v: k for k, v in data.finding_ids.items()}
    with session_scope(engine) as session:
        for order, expected in (("critical", ORDER_CRITICAL), ("uncertain", ORDER_UNCERTAIN)):
            pages = [
                reviews.queue(
                    session=session,
                    flt=reviews.QueueFilter(),
                    order=order,
                    critical_ids=CRITICAL,
                    offset=offset,
                    limit=2,
                )[0]
                for offset in (0, 2, 4, 6)
            ]
            assert [[by_id[i.finding_id] for i in page] for page in pages] == [
                expected[0:2],
                expected[2:4],
                expected[4:6],
                [],
            ]
            assert reviews.queue_ids(
                session=session, flt=reviews.QueueFilter(), order=order, critical_ids=CRITICAL
            ) == [data.finding_ids[q] for q in expected]
        items, _ = reviews.queue(session=session, flt=reviews.QueueFilter(), order="critical", critical_ids=CRITICAL)
        assert [i.critical for i in items] == [q in CRITICAL for q in ORDER_CRITICAL]


def test_totals_and_counts_up_to_a_limit_agree_with_the_exact_ones(seeded):
    engine, data = seeded
    with session_scope(engine) as session:
        rita = reviews.get_user(session=session, name="rita")
        assert rita is not None
        ids = data.finding_ids
        reviews.decide(session=session, user=rita, finding_id=ids["pneumothorax"], decision="correct", to_answer="no")
        reviews.decide(session=session, user=rita, finding_id=ids["ct_lung_nodule"], decision="reject")
        reviews.decide(session=session, user=rita, finding_id=ids["ct_lung_nodule"], decision="confirm")
        reviews.decide(session=session, user=rita, finding_id=ids["cardiomegaly"], decision="confirm")
        reviews.decide(session=session, user=rita, finding_id=ids["cardiomegaly"], decision="comment", comment="x")
    with session_scope(engine) as session:
        exact = reviews.queue_counts(session=session)
        assert exact == {"flagged": 4, "pending": 3, "confirmed": 2, "rejected": 0, "corrected": 1}
        assert reviews.queue_counts(session=session, count_limit=100) == exact
        # counted up to the limit + 1: "more than the limit"
        assert reviews.queue_counts(session=session, count_limit=1) == {
            "flagged": 2,
            "pending": 2,
            "confirmed": 2,
            "rejected": 0,
            "corrected": 1,
        }
        for state, total in (("pending", 3), ("confirmed", 2), ("corrected", 1), ("rejected", 0), ("any", 6)):
            flt = reviews.QueueFilter(state=state)  # type: ignore[arg-type]
            _, exact_total = reviews.queue(session=session, flt=flt, order="critical", critical_ids=CRITICAL)
            _, capped = reviews.queue(session=session, flt=flt, order="critical", critical_ids=CRITICAL, count_limit=1)
            assert (exact_total, capped) == (total, min(total, 2))
