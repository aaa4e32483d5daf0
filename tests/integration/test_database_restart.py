"""A Postgres restart in the middle of a nightly: the run does not end with it. Bookkeeping waits for the
database (`database.outage_s`), and so does a study whose task failed for a lost connection past the
task's own retries (then the task goes again): the run finishes every study, each annotated once, on its
first attempt, with nothing lost or duplicated."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import func
from sqlmodel import Session, select

from db.migrate import upgrade
from db.models import Finding, Run, Study
from db.session import is_disconnect, make_engine, while_unreachable
from flows.nightly import run_nightly

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]
OUTAGE_S = 4.0  # how long the database stays down: longer than a task's own retries (3 × 0.5 s)


def poll(condition, what: str, timeout_s: float = 120) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_waiting_out_an_unreachable_database(postgres, postgres_url) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(postgres_url)
    upgrade(postgres_url)

    def count_studies() -> int:
        with Session(engine) as session:
            return int(session.exec(select(func.count()).select_from(Study)).one())

    postgres.down()
    try:
        with pytest.raises(Exception) as refused:  # noqa: PT011 - whatever the driver raises: checked below
            count_studies()
        assert is_disconnect(refused.value)
        with pytest.raises(Exception) as gave_up:  # noqa: PT011
            while_unreachable(count_studies, outage_s=0.5, first_wait_s=0.1)
        assert is_disconnect(gave_up.value), "past outage_s the error itself comes out"
        restarted = threading.Timer(1.0, postgres.up)  # the outage: the database comes back after a second
        restarted.start()
        assert while_unreachable(count_studies, outage_s=60, first_wait_s=0.1) == 0
        restarted.join()
    finally:
        if not _ready(postgres):
            postgres.up()
        engine.dispose()


def _ready(postgres) -> bool:  # type: ignore[no-untyped-def]
    try:
        return bool(postgres.ready())
    except Exception:
        return False


def test_a_postgres_restart_mid_run_loses_nothing(  # type: ignore[no-untyped-def]
    prefect_harness, make_settings, sample_pacs, postgres, postgres_url
) -> None:
    settings = make_settings(
        pacs={"port": sample_pacs.port, "called_ae": sample_pacs.ae_title},
        database={"url": postgres_url, "outage_s": 60},
        flow={"retries": 3, "retry_delay_s": 0.5, "concurrency": 2},
    )
    upgrade(postgres_url)
    engine = make_engine(postgres_url)

    def done() -> int:
        try:
            with Session(engine) as session:
                return int(session.exec(select(func.count()).where(Study.status == "done").select_from(Study)).one())
        except Exception:
            return 0

    restarts: list[int] = []

    def restart_after_the_first_study() -> None:
        poll(lambda: done() >= 1, "the first study done")
        restarts.append(done())
        engine.dispose()
        postgres.down()
        time.sleep(OUTAGE_S)  # the outage itself (not a readiness wait)
        postgres.up()

    restarter = threading.Thread(target=restart_after_the_first_study, daemon=True)
    restarter.start()
    try:
        first = run_nightly(settings)
    finally:
        restarter.join(timeout=180)
    assert restarts, "the database was restarted during the run"
    assert restarts[0] < 5, "the restart came while studies were still to do"
    assert first["pending"] == 5
    assert not first.get("studies_failed"), "the restart cost no study an attempt"
    second = run_nightly(settings)
    assert second["pending"] == 0, "the first run finished every study"
    with Session(engine) as session:
        statuses = list(session.exec(select(Study.status)).all())
        attempts = list(session.exec(select(Study.attempts)).all())
        runs = session.exec(select(Run).order_by(Run.id)).all()
        findings = session.exec(select(Finding)).all()
    assert sorted(statuses) == ["done"] * 5, statuses
    assert attempts == [1] * 5, attempts
    # the sample PACS's study 2 holds two instances that cannot be rendered: "with failures" is its doing
    assert runs[0].status in ("completed", "completed_with_failures"), "the run did not end"
    keys = [(f.image_id, f.model_version_id, f.question_id, f.bank_version) for f in findings]
    assert len(keys) == len(set(keys)) == 6 * 8 + 3 * 3 + 3 * 3, "every finding once"
    assert first["studies_done"] == 5
    engine.dispose()
