"""The study ledger: every change of a study's state, in one place.

    receiving ─release─▶ new ─start_attempt─▶ retrieving ─finish─▶ done
                          ▲                       │
                          │                       ├─fail (worth retrying, attempts left)─▶ incomplete ─▶ …
                          │                       ├─fail (permanent, or the last attempt)─▶ failed (reason)
                          └──────── abandon ──────┘ a stop (SIGTERM, Ctrl-C, cancellation): the attempt
                                                    is not counted, the study stays pending

An attempt is counted when a study's retrieval really starts (`claim`, or `start_attempt`), never when a
run merely plans it, so crashes before a study was reached cost it nothing. `claim` also gives the study
a lease: one worker at a time works on it ("host:pid" in `lease_owner`), renewing the lease while it
does (`renew`); a study whose lease ran out (its worker died, on any machine) can be claimed again.
A study that reached `max_attempts` always ends `failed` with a reason (`give_up_exhausted`), and what
a dead process left behind (runs still `running`, studies still `retrieving`) is recovered by the next
run (`recover`). Every function takes an explicit session and commits nothing itself: the caller's `session_scope` does.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, or_, update
from sqlmodel import Session, col, select

from db import repository as repo
from db.models import Run, Study, StudyStatus, utcnow

INTERRUPTED = "interrupted"  # a run's status when a stop ended it, or when its process died


def owner() -> dict[str, Any]:
    """Who runs a run: this host and process (stored on the run, read by `recover`)."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def pending(*, session: Session, max_attempts: int, source_id: int | None = None) -> list[Study]:
    """Studies to process, oldest first: new or incomplete, with attempts left."""
    return repo.pending_studies(session=session, max_attempts=max_attempts, source_id=source_id)


def lease_owner() -> str:
    """This process as a lease owner: "host:pid"."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _lease_dead(owner: str | None, alive: Callable[[int], bool]) -> bool:
    """A lease held by a process of this host that is gone (known at once, without waiting for expiry)."""
    host, _, pid = (owner or "").rpartition(":")
    return host == socket.gethostname() and pid.isdigit() and not alive(int(pid))


def claim(
    *, session: Session, study_id: int, owner: str, lease_s: float, max_attempts: int, now: dt.datetime | None = None
) -> Study | None:
    """Take the study for one attempt, atomically: only when it is pending with an attempt left, or was
    being worked on under a lease that ran out. The attempt is counted and the lease runs `lease_s`.
    None: another worker has it, or it needs nothing (done, failed, no attempt left)."""
    now = now or utcnow()
    takeable = or_(
        col(Study.status).in_(StudyStatus.PENDING),
        and_(col(Study.status) == StudyStatus.RETRIEVING, col(Study.lease_until) < now),
    )
    stmt = (
        update(Study)
        .where(col(Study.id) == study_id, col(Study.attempts) < max_attempts, takeable)
        .values(
            status=StudyStatus.RETRIEVING,
            attempts=col(Study.attempts) + 1,
            lease_owner=owner,
            lease_until=now + dt.timedelta(seconds=lease_s),
            updated_at=now,
        )
    )
    if session.exec(stmt).rowcount != 1:  # type: ignore[call-overload]
        return None
    study = _study(session, study_id)
    session.refresh(study)
    return study


def renew(*, session: Session, study_id: int, owner: str, lease_s: float) -> bool:
    """Extend our lease on a study we work on; False when it is no longer ours (it ran out and another
    worker took the study, or it ended)."""
    now = utcnow()
    stmt = (
        update(Study)
        .where(
            col(Study.id) == study_id,
            col(Study.lease_owner) == owner,
            col(Study.status) == StudyStatus.RETRIEVING,
        )
        .values(lease_until=now + dt.timedelta(seconds=lease_s))
    )
    return bool(session.exec(stmt).rowcount == 1)  # type: ignore[call-overload]


def start_attempt(*, session: Session, study_id: int) -> Study:
    """Retrieval starts: this is an attempt, and it is counted."""
    study = _study(session, study_id)
    return repo.update_study(
        session=session, study_id=study_id, status=StudyStatus.RETRIEVING, attempts=study.attempts + 1
    )


def finish(*, session: Session, study_id: int) -> Study:
    """Its results are recorded: done."""
    study = repo.update_study(
        session=session, study_id=study_id, status=StudyStatus.DONE, last_error=None, lease_owner=None, lease_until=None
    )
    repo.resolve_failures(session=session, stage="study", object_ref=f"study:{study_id}")
    return study


def fail(
    *,
    session: Session,
    study_id: int,
    error: BaseException | str,
    permanent: bool,
    max_attempts: int,
    run_id: int | None,
) -> str:
    """An attempt failed: `failed` when retrying will not help or no attempt is left, else `incomplete`
    (the next run tries again). The failure row says why; the returned status says what happened."""
    study = _study(session, study_id)
    gave_up = permanent or study.attempts >= max_attempts
    status = StudyStatus.FAILED if gave_up else StudyStatus.INCOMPLETE
    message = str(error) if isinstance(error, BaseException) else error
    repo.update_study(
        session=session,
        study_id=study_id,
        status=status,
        last_error=message[:1000],
        lease_owner=None,
        lease_until=None,
    )
    repo.record_failure(
        session=session, stage="study", object_ref=f"study:{study_id}", error=error, study_id=study_id, run_id=run_id
    )
    return status


def abandon(*, session: Session, study_id: int, counted: bool) -> None:
    """A stop ended the study's attempt: back to pending, and if the attempt was counted, uncounted."""
    study = _study(session, study_id)
    if study.status in (StudyStatus.DONE, StudyStatus.FAILED):
        return
    attempts = max(0, study.attempts - 1) if counted else study.attempts
    status = StudyStatus.INCOMPLETE if attempts else StudyStatus.NEW
    repo.update_study(
        session=session, study_id=study_id, status=status, attempts=attempts, lease_owner=None, lease_until=None
    )


def reset(*, session: Session, study_id: int) -> None:
    """Run a study again from scratch (`annotate-study`): pending, no attempt counted."""
    repo.update_study(
        session=session,
        study_id=study_id,
        status=StudyStatus.INCOMPLETE,
        attempts=0,
        lease_owner=None,
        lease_until=None,
    )


def give_up_exhausted(*, session: Session, max_attempts: int, run_id: int | None) -> int:
    """Studies left pending with no attempt left (e.g. `max_attempts` lowered, or crashes during their
    attempts) end `failed` with a reason instead of waiting forever; returns how many."""
    stmt = select(Study).where(col(Study.status).in_(StudyStatus.PENDING), Study.attempts >= max_attempts)
    exhausted = list(session.exec(stmt))
    for study in exhausted:
        assert study.id is not None
        reason = f"gave up after {study.attempts} attempts" + (
            f"; last error: {study.last_error}" if study.last_error else ""
        )
        repo.update_study(session=session, study_id=study.id, status=StudyStatus.FAILED, last_error=reason[:1000])
        repo.record_failure(
            session=session,
            stage="study",
            object_ref=f"study:{study.id}",
            error=reason,
            study_id=study.id,
            run_id=run_id,
        )
    return len(exhausted)


@dataclass(frozen=True)
class Recovered:
    runs: int  # runs left `running` by a dead process, now `interrupted`
    studies: int  # studies left `retrieving` by one, now pending again


def _orphaned(study: Study, *, now: dt.datetime, alive: Callable[[int], bool], any_live_run: bool) -> bool:
    """A study left `retrieving` that nobody works on: its lease ran out, or its owner was a process of
    this host that is gone; without a lease (an attempt started by `start_attempt`), when no run lives."""
    if study.lease_owner is not None:
        until = study.lease_until
        if until is not None and until.tzinfo is None:
            until = until.replace(tzinfo=dt.UTC)
        return (until is not None and until < now) or _lease_dead(study.lease_owner, alive)
    return not any_live_run


def recover(*, session: Session, alive: Callable[[int], bool] = process_alive) -> Recovered:
    """What a dead process left behind: runs of this host's dead processes end `interrupted`; studies left
    `retrieving` whose lease ran out or whose owner on this host is gone (or, without a lease, when no
    live run remains) go back to pending (their attempt stays counted: it was real). Runs of other hosts
    are left alone (their own next start recovers them); their studies come back when their leases run out."""
    here = socket.gethostname()
    runs = 0
    for run in session.exec(select(Run).where(Run.status == "running")):
        who = run.parameters.get("owner") or {}
        if who.get("host") == here and isinstance(who.get("pid"), int) and not alive(who["pid"]):
            run.status, run.finished_at = INTERRUPTED, utcnow()
            session.add(run)
            runs += 1
    session.flush()
    studies = 0
    any_live_run = session.exec(select(Run).where(Run.status == "running")).first() is not None
    now = utcnow()
    for study in session.exec(select(Study).where(Study.status == StudyStatus.RETRIEVING)).all():
        if _orphaned(study, now=now, alive=alive, any_live_run=any_live_run):
            study.status, study.updated_at = StudyStatus.INCOMPLETE, now
            study.lease_owner, study.lease_until = None, None
            session.add(study)
            studies += 1
    return Recovered(runs=runs, studies=studies)


def stranded(*, session: Session, max_attempts: int, alive: Callable[[int], bool] = process_alive) -> dict[str, int]:
    """Work nobody will pick up as things stand (what `nightread status` warns about): pending studies
    with no attempt left, studies `retrieving` with no live run, runs `running` whose process is gone."""
    here = socket.gethostname()
    dead_runs = 0
    live_runs = 0
    for run in session.exec(select(Run).where(Run.status == "running")):
        who = run.parameters.get("owner") or {}
        if who.get("host") == here and isinstance(who.get("pid"), int) and not alive(who["pid"]):
            dead_runs += 1
        else:
            live_runs += 1
    exhausted = len(
        session.exec(
            select(Study.id).where(col(Study.status).in_(StudyStatus.PENDING), Study.attempts >= max_attempts)
        ).all()
    )
    now = utcnow()
    orphaned = sum(
        _orphaned(study, now=now, alive=alive, any_live_run=live_runs > 0)
        for study in session.exec(select(Study).where(Study.status == StudyStatus.RETRIEVING)).all()
    )
    return {
        "studies_without_attempts_left": exhausted,
        "studies_retrieving_without_a_run": orphaned,
        "dead_runs": dead_runs,
    }


def _study(session: Session, study_id: int) -> Study:
    study = session.get(Study, study_id)
    if study is None:
        raise LookupError(f"no study with id {study_id}")
    return study
