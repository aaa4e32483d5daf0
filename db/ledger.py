"""The study ledger: every change of a study's state, in one place.

    receiving ─release─▶ new ─start_attempt─▶ retrieving ─finish─▶ done
                          ▲                       │
                          │                       ├─fail (worth retrying, attempts left)─▶ incomplete ─▶ …
                          │                       ├─fail (permanent, or the last attempt)─▶ failed (reason)
                          └──────── abandon ──────┘ a stop (SIGTERM, Ctrl-C, cancellation): the attempt
                                                    is not counted, the study stays pending

An attempt is counted when a study's retrieval really starts (`start_attempt`), never when a run merely
plans it, so crashes before a study was reached cost it nothing. A study that reached `max_attempts`
always ends `failed` with a reason (`give_up_exhausted`), and what a dead process left behind (runs
still `running`, studies still `retrieving`) is recovered by the next run (`recover`). Every function
takes an explicit session and commits nothing itself: the caller's `session_scope` does.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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


def start_attempt(*, session: Session, study_id: int) -> Study:
    """Retrieval starts: this is an attempt, and it is counted."""
    study = _study(session, study_id)
    return repo.update_study(
        session=session, study_id=study_id, status=StudyStatus.RETRIEVING, attempts=study.attempts + 1
    )


def finish(*, session: Session, study_id: int) -> Study:
    """Its results are recorded: done."""
    study = repo.update_study(session=session, study_id=study_id, status=StudyStatus.DONE, last_error=None)
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
    repo.update_study(session=session, study_id=study_id, status=status, last_error=message[:1000])
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
    repo.update_study(session=session, study_id=study_id, status=status, attempts=attempts)


def reset(*, session: Session, study_id: int) -> None:
    """Run a study again from scratch (`annotate-study`): pending, no attempt counted."""
    repo.update_study(session=session, study_id=study_id, status=StudyStatus.INCOMPLETE, attempts=0)


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


def recover(*, session: Session, alive: Callable[[int], bool] = process_alive) -> Recovered:
    """What a dead process on this host left behind: its runs end `interrupted`; studies left
    `retrieving` when no live run remains go back to pending (their attempt stays counted: it was real).
    Runs of other hosts are left alone (their own next start recovers them)."""
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
    if session.exec(select(Run).where(Run.status == "running")).first() is None:
        for study in session.exec(select(Study).where(Study.status == StudyStatus.RETRIEVING)):
            study.status, study.updated_at = StudyStatus.INCOMPLETE, utcnow()
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
    orphaned = (
        0 if live_runs else len(session.exec(select(Study.id).where(Study.status == StudyStatus.RETRIEVING)).all())
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
