"""The study ledger: attempts counted only when retrieval starts, a stop never fails work, exhausted
studies end failed with a reason, and what a dead process left behind is recovered."""

from __future__ import annotations

import os

import pytest
from sqlmodel import select

from db import ledger
from db import repository as repo
from db.migrate import upgrade
from db.models import Failure, Run, Study, StudyStatus
from db.session import make_engine, session_scope


@pytest.fixture
def engine(tmp_path):  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    upgrade(url)
    engine = make_engine(url)
    with session_scope(engine) as session:
        source = repo.upsert_source(
            session=session, name="pacs", kind="dimse", ae_title="X", host="h", port=1, url=None, config={}
        )
        assert source.id is not None
        repo.register_studies(
            session=session,
            source_id=source.id,
            studies=[
                {"study_instance_uid": f"1.2.{i}", "study_date": "20260101", "study_time": f"0{i}0000"}
                for i in range(3)
            ],
        )
    yield engine
    engine.dispose()


def ids(engine) -> list[int]:  # type: ignore[no-untyped-def]
    with session_scope(engine) as session:
        return [s.id for s in session.exec(select(Study).order_by(Study.id)).all()]


def study(engine, study_id: int) -> Study:  # type: ignore[no-untyped-def]
    with session_scope(engine) as session:
        found = session.get(Study, study_id)
        assert found is not None
        session.expunge(found)
        return found


def test_an_attempt_counts_when_retrieval_starts_and_a_stop_takes_it_back(engine) -> None:
    first, second, _ = ids(engine)
    with session_scope(engine) as session:
        assert [s.id for s in ledger.pending(session=session, max_attempts=3)] == ids(engine)
        ledger.start_attempt(session=session, study_id=first)
    assert (study(engine, first).status, study(engine, first).attempts) == (StudyStatus.RETRIEVING, 1)
    with session_scope(engine) as session:
        assert first not in [s.id for s in ledger.pending(session=session, max_attempts=3)], "in flight"
        ledger.abandon(session=session, study_id=first, counted=True)
        ledger.abandon(session=session, study_id=second, counted=False)  # stopped before it started
    assert (study(engine, first).status, study(engine, first).attempts) == (StudyStatus.NEW, 0)
    assert (study(engine, second).status, study(engine, second).attempts) == (StudyStatus.NEW, 0)


def test_failures_retry_until_the_last_attempt_then_fail_with_a_reason(engine) -> None:
    first, second, _ = ids(engine)
    statuses = []
    for _ in range(3):
        with session_scope(engine) as session:
            ledger.start_attempt(session=session, study_id=first)
            statuses.append(
                ledger.fail(
                    session=session, study_id=first, error="PACS busy", permanent=False, max_attempts=3, run_id=None
                )
            )
    assert statuses == [StudyStatus.INCOMPLETE, StudyStatus.INCOMPLETE, StudyStatus.FAILED]
    with session_scope(engine) as session:
        ledger.start_attempt(session=session, study_id=second)
        assert (
            ledger.fail(session=session, study_id=second, error="refused", permanent=True, max_attempts=3, run_id=None)
            == StudyStatus.FAILED
        )
        failures = {f.object_ref: f for f in session.exec(select(Failure)).all()}
    assert failures[f"study:{first}"].attempts == 3
    assert failures[f"study:{second}"].message == "refused"
    with session_scope(engine) as session:
        ledger.finish(session=session, study_id=first)
        assert session.get(Failure, failures[f"study:{first}"].id).resolved


def test_exhausted_studies_end_failed_with_a_reason_instead_of_waiting_forever(engine) -> None:
    first, second, third = ids(engine)
    with session_scope(engine) as session:  # three crashes during `first`'s attempts; `second` lowered max
        repo.update_study(session=session, study_id=first, status=StudyStatus.INCOMPLETE, attempts=3, last_error="lost")
        repo.update_study(session=session, study_id=second, attempts=2)
        assert ledger.stranded(session=session, max_attempts=2)["studies_without_attempts_left"] == 2
        assert ledger.give_up_exhausted(session=session, max_attempts=2, run_id=None) == 2
    assert study(engine, first).status == StudyStatus.FAILED
    assert study(engine, first).last_error == "gave up after 3 attempts; last error: lost"
    assert study(engine, second).last_error == "gave up after 2 attempts"
    assert study(engine, third).status == StudyStatus.NEW
    with session_scope(engine) as session:
        assert ledger.stranded(session=session, max_attempts=2)["studies_without_attempts_left"] == 0


def test_a_dead_processs_runs_and_studies_are_recovered_and_a_live_ones_are_not(engine) -> None:
    first, second, _ = ids(engine)
    dead_pid = 2**22 + 12345  # above the kernel's pid_max default: no such process
    with session_scope(engine) as session:
        dead = repo.start_run(
            session=session, kind="nightly", flow_run_id=None, parameters={"owner": {**ledger.owner(), "pid": dead_pid}}
        )
        ledger.start_attempt(session=session, study_id=first)
        assert ledger.stranded(session=session, max_attempts=3) == {
            "studies_without_attempts_left": 0,
            "studies_retrieving_without_a_run": 1,  # its only run is dead
            "dead_runs": 1,
        }
        live = repo.start_run(session=session, kind="nightly", flow_run_id=None, parameters={"owner": ledger.owner()})
    with session_scope(engine) as session:
        recovered = ledger.recover(session=session)
    assert recovered == ledger.Recovered(runs=1, studies=0), "a live run may own the retrieving study"
    with session_scope(engine) as session:
        repo.finish_run(session=session, run_id=live, status="completed", counts={})
    with session_scope(engine) as session:
        assert ledger.recover(session=session) == ledger.Recovered(runs=0, studies=1)
        runs = {r.id: r.status for r in session.exec(select(Run)).all()}
    assert runs[dead] == ledger.INTERRUPTED
    assert (study(engine, first).status, study(engine, first).attempts) == (StudyStatus.INCOMPLETE, 1)
    assert study(engine, second).status == StudyStatus.NEW
    assert ledger.process_alive(os.getpid())
    assert not ledger.process_alive(dead_pid)


# --- leases: one worker at a time ---------------------------------------------------------------------


def test_a_study_is_claimed_once_and_its_lease_is_renewed_by_its_owner_only(engine) -> None:
    first, _, _ = ids(engine)
    with session_scope(engine) as session:
        taken = ledger.claim(session=session, study_id=first, owner="a:1", lease_s=60, max_attempts=3)
        assert taken is not None
        assert (taken.status, taken.attempts, taken.lease_owner) == (StudyStatus.RETRIEVING, 1, "a:1")
    with session_scope(engine) as session:
        assert ledger.claim(session=session, study_id=first, owner="b:2", lease_s=60, max_attempts=3) is None
        assert ledger.renew(session=session, study_id=first, owner="a:1", lease_s=60)
        assert not ledger.renew(session=session, study_id=first, owner="b:2", lease_s=60)
    with session_scope(engine) as session:
        ledger.finish(session=session, study_id=first)
    done = study(engine, first)
    assert (done.status, done.lease_owner, done.lease_until) == (StudyStatus.DONE, None, None)
    with session_scope(engine) as session:
        assert ledger.claim(session=session, study_id=first, owner="b:2", lease_s=60, max_attempts=3) is None, "done"
        assert not ledger.renew(session=session, study_id=first, owner="a:1", lease_s=60), "ended"


def test_a_lease_that_ran_out_is_taken_again_and_its_attempt_counted(engine) -> None:
    import datetime as dt

    from db.models import utcnow

    first, _, _ = ids(engine)
    past = utcnow() - dt.timedelta(minutes=10)
    with session_scope(engine) as session:
        assert ledger.claim(session=session, study_id=first, owner="gone:1", lease_s=60, max_attempts=3, now=past)
    with session_scope(engine) as session:
        taken = ledger.claim(session=session, study_id=first, owner="b:2", lease_s=60, max_attempts=3)
        assert taken is not None
        assert (taken.lease_owner, taken.attempts) == ("b:2", 2)
    with session_scope(engine) as session:  # no attempt left: not taken, whatever its lease
        assert ledger.claim(session=session, study_id=first, owner="c:3", lease_s=60, max_attempts=2, now=past) is None


def test_recover_frees_studies_of_expired_leases_and_of_dead_local_owners_not_live_ones(engine) -> None:
    import datetime as dt
    import socket

    from db.models import utcnow

    expired, dead_owner, live = ids(engine)
    here = socket.gethostname()
    with session_scope(engine) as session:
        ledger.claim(
            session=session,
            study_id=expired,
            owner="elsewhere:7",
            lease_s=60,
            max_attempts=3,
            now=utcnow() - dt.timedelta(minutes=5),
        )
        ledger.claim(session=session, study_id=dead_owner, owner=f"{here}:999999", lease_s=600, max_attempts=3)
        ledger.claim(session=session, study_id=live, owner=f"{here}:{os.getpid()}", lease_s=600, max_attempts=3)
    with session_scope(engine) as session:
        left = ledger.stranded(session=session, max_attempts=3, alive=lambda pid: pid == os.getpid())
        assert left["studies_retrieving_without_a_run"] == 2
        recovered = ledger.recover(session=session, alive=lambda pid: pid == os.getpid())
    assert recovered.studies == 2
    assert study(engine, expired).status == study(engine, dead_owner).status == StudyStatus.INCOMPLETE
    assert study(engine, expired).lease_owner is None
    assert (study(engine, live).status, study(engine, live).lease_owner) == (
        StudyStatus.RETRIEVING,
        f"{here}:{os.getpid()}",
    )
