"""@flow backfill: years of studies from a PACS, day by day, resumable, polite to the PACS.

Backfill progress is a `backfill` row (the next day to query): a stopped backfill started again with
the same source, dates and modalities resumes at the first day it had not finished; studies already
done are not touched again. A day whose C-FIND answer reaches the PACS's result cap
(`backfill.result_limit`) is split into time windows until each answer is below the cap. Outside the
off-peak window (`backfill.window`, e.g. 19:00-07:00) the flow pauses (status `paused`, resumed by
the next start, e.g. the deployment's hourly schedule); `backfill.studies_per_hour` spaces
retrievals; `flow.concurrency` bounds the associations at once."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner
from sqlmodel import col, select

from db import repository as repo
from db.models import Backfill, Study, StudyStatus, utcnow
from db.session import session_scope
from flows.annotate import check_promoted, process_study, retry_transient
from flows.discovery import find_day
from flows.nightly import register_refs
from flows.wiring.runtime import Runtime
from flows.wiring.settings import NightreadSettings, parse_window
from flows.wiring.throttle import apply_limits, shared_api
from integrations.errors import ConfigurationError


def now() -> dt.datetime:
    """The local wall clock (a function so tests can set the time of day)."""
    return dt.datetime.now()


def in_window(window: str | None, at: dt.datetime) -> bool:
    """True when `at` falls in the off-peak window (which may run over midnight); no window: always."""
    if not window:
        return True
    start, end = parse_window(window)
    minute = at.hour * 60 + at.minute
    if start == end:
        return True
    return start <= minute < end if start < end else (minute >= start or minute < end)


class RateLimit:
    """At most `per_hour` acquisitions per hour, evenly spaced (a deliberate wait, not a readiness poll)."""

    def __init__(self, per_hour: float | None, sleep: Callable[[float], None] = time.sleep) -> None:
        self.interval = 3600.0 / per_hour if per_hour else 0.0
        self._next = 0.0
        self._lock = threading.Lock()
        self._sleep = sleep

    def acquire(self) -> None:
        if not self.interval:
            return
        with self._lock:
            t = time.monotonic()
            wait = max(0.0, self._next - t)
            self._next = max(t, self._next) + self.interval
        if wait:
            self._sleep(wait)


@task(name="backfill-day", cache_policy=NO_CACHE, retry_condition_fn=retry_transient)
def register_day(rt: Runtime, source_id: int, day: str, modalities: Sequence[str]) -> dict[str, int]:
    counts: Counter[str] = Counter()
    refs = find_day(
        rt.source(source_id), day=day, modalities=modalities, limit=rt.settings.backfill.result_limit, counts=counts
    )
    with session_scope(rt.engine) as session:
        new = register_refs(session=session, source_id=source_id, refs=refs)
    return {**counts, "found": len(refs), "new": new}


def backfill_key(source: str, start: str, end: str, modalities: Sequence[str]) -> str:
    return f"{source}:{start}:{end}:{','.join(sorted(m.upper() for m in modalities))}"


def _day(text: str) -> dt.date:
    try:
        return dt.datetime.strptime(text.replace("-", ""), "%Y%m%d").date()
    except ValueError:
        raise ConfigurationError(f"a backfill date is YYYY-MM-DD, not {text!r}") from None


@flow(name="backfill", log_prints=False)
def backfill(
    start_date: str,
    end_date: str,
    modalities: list[str] | None = None,
    source: str | None = None,
    settings: NightreadSettings | None = None,
) -> dict[str, Any]:
    """Discover and annotate every study from `start_date` to `end_date` (inclusive) in one source."""
    settings = settings or NightreadSettings()
    logger = get_run_logger()
    first, last = _day(start_date), _day(end_date)
    if last < first:
        raise ConfigurationError(f"backfill end {end_date} is before its start {start_date}")
    mods = [m.upper() for m in modalities or []]
    counts: Counter[str] = Counter()
    limiter = RateLimit(settings.backfill.studies_per_hour)
    with Runtime.build(settings) as rt:
        throttled = shared_api()
        ids = rt.register_sources(throttle=throttled)
        if throttled:
            apply_limits([rt.source_settings(i) for i in ids])
        by_name = {rt.source_settings(i).name: i for i in ids}
        if source is None:
            if not by_name:
                raise ConfigurationError("no enabled PACS source to backfill from")
            source = next(iter(by_name))
        if source not in by_name:
            raise ConfigurationError(f"no enabled source named {source!r} (have: {', '.join(by_name) or 'none'})")
        source_id = by_name[source]
        if rt.source_settings(source_id).kind == "push":
            raise ConfigurationError(f"source {source!r} is a push source: there is no archive to backfill from")
        if settings.inference.require_promoted:
            check_promoted(rt)
        key = backfill_key(source, f"{first:%Y%m%d}", f"{last:%Y%m%d}", mods)
        with session_scope(rt.engine) as session:
            row = session.exec(select(Backfill).where(Backfill.key == key)).first()
            if row is None:
                row = Backfill(
                    key=key,
                    source_id=source_id,
                    start_date=f"{first:%Y%m%d}",
                    end_date=f"{last:%Y%m%d}",
                    modalities=",".join(mods),
                    next_date=f"{first:%Y%m%d}",
                )
                session.add(row)
                session.flush()
            backfill_id = row.id
            day = _day(row.next_date)
            run_id = repo.start_run(
                session=session,
                kind="backfill",
                flow_run_id=None,
                parameters={"source": source, "start": start_date, "end": end_date, "modalities": mods},
            )
        status = "failed"
        try:
            while day <= last:
                if not in_window(settings.backfill.window, now()):
                    logger.info("outside the off-peak window %s: pausing at %s", settings.backfill.window, day)
                    status = "paused"
                    break
                day_text = f"{day:%Y%m%d}"
                counts.update(
                    register_day.with_options(
                        retries=settings.flow.retries, retry_delay_seconds=settings.flow.retry_delay_s
                    )(rt, source_id, day_text, mods)
                )
                with session_scope(rt.engine) as session:
                    pending = [
                        s.id
                        for s in session.exec(
                            select(Study).where(
                                Study.source_id == source_id,
                                Study.study_date == day_text,
                                col(Study.status).in_(StudyStatus.PENDING),
                                col(Study.attempts) < settings.flow.max_attempts,
                            )
                        ).all()
                        if s.id is not None
                    ]
                futures = []
                for study_id in pending:
                    limiter.acquire()
                    futures.append(process_study.submit(rt, study_id, run_id))
                for future in futures:
                    counts.update(future.result())
                day += dt.timedelta(days=1)
                with session_scope(rt.engine) as session:
                    row = session.get(Backfill, backfill_id)
                    assert row is not None
                    row.next_date = f"{day:%Y%m%d}"
                    row.days_done += 1
                    row.status = "running"
                    row.updated_at = utcnow()
                    session.add(row)
                counts["days"] += 1
            else:
                status = "done"
        finally:
            with session_scope(rt.engine) as session:
                row = session.get(Backfill, backfill_id)
                assert row is not None
                row.status = status if status in ("done", "paused") else "running"
                row.queries += counts["queries"]
                row.studies_found += counts["found"]
                row.studies_new += counts["new"]
                row.updated_at = utcnow()
                session.add(row)
                result: dict[str, Any] = {**counts, "status": status, "next_date": row.next_date}
                repo.finish_run(
                    session=session,
                    run_id=run_id,
                    status="completed" if status in ("done", "paused") else "failed",
                    counts=result,
                )
    return result


def run_backfill(settings: NightreadSettings, **kwargs: Any) -> dict[str, Any]:
    if settings.backfill.associations is not None:  # the backfill's own bound on retrievals at once
        settings = settings.model_copy(
            update={"flow": settings.flow.model_copy(update={"concurrency": settings.backfill.associations})}
        )
    runner: Any = ThreadPoolTaskRunner(max_workers=settings.flow.concurrency + settings.flow.annotating_studies)
    out: dict[str, Any] = backfill.with_options(task_runner=runner)(settings=settings, **kwargs)
    return out
