"""@flow nightly: discover new studies in every enabled PACS source, then process each (bounded concurrency)."""

from __future__ import annotations

import datetime as dt
import time
from collections import Counter
from collections.abc import Sequence
from functools import partial
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context
from prefect.task_runners import ThreadPoolTaskRunner

from db import ledger
from db import repository as repo
from db.models import PacsSource, Study, utcnow
from db.session import session_scope
from flows.annotate import check_promoted, process_study, retry_transient
from flows.discovery import find_since
from flows.wiring.runtime import Runtime
from flows.wiring.settings import NightreadSettings
from flows.wiring.throttle import apply_limits, shared_api
from integrations.ports import StudyRef


def _since(source: PacsSource, lookback_days: int, requery_days: int = 0) -> dt.datetime:
    """Where discovery starts: `requery_days` before the cursor (a study archived late with an earlier
    date is still found; registration is idempotent), or `lookback_days` back the first time."""
    if source.cursor_date:
        cursor = dt.datetime.strptime(f"{source.cursor_date}{source.cursor_time or '000000'}", "%Y%m%d%H%M%S")
        return cursor - dt.timedelta(days=requery_days)
    today = dt.datetime.combine(dt.date.today(), dt.time())
    return today - dt.timedelta(days=lookback_days)


def register_refs(*, session: Any, source_id: int, refs: Sequence[StudyRef]) -> int:
    """Register what a PACS answered (new studies only); returns how many were new."""
    return repo.register_studies(
        session=session,
        source_id=source_id,
        studies=[
            {
                "study_instance_uid": r.study_instance_uid,
                "study_date": r.study_date,
                "study_time": r.sort_key[1],
                "accession_number": r.accession_number,
                "modalities": r.modalities,
                "number_of_instances": r.number_of_instances,
            }
            for r in refs
        ],
    )


@task(name="discover-studies", cache_policy=NO_CACHE, retry_condition_fn=retry_transient)
def discover_studies(rt: Runtime, source_id: int) -> dict[str, int]:
    """C-FIND/QIDO from the source's cursor (less its re-query window); register new studies and move the
    cursor in one transaction."""
    p = rt.source_settings(source_id)
    if p.kind == "push":  # nothing to query: pushed studies that are complete become new
        quiet_before = utcnow() - dt.timedelta(seconds=p.quiet_period_s)
        with session_scope(rt.engine) as session:
            released = repo.release_received_studies(session=session, source_id=source_id, quiet_before=quiet_before)
        return {"found": released, "new": released}
    with session_scope(rt.engine) as session:
        source = session.get(PacsSource, source_id)
        assert source is not None
        since = _since(source, p.lookback_days, p.requery_days)
    counts: Counter[str] = Counter()
    refs = find_since(
        rt.source(source_id),
        since=since,
        modalities=p.modalities,
        limit=rt.settings.backfill.result_limit,
        counts=counts,
    )
    with session_scope(rt.engine) as session:
        new = register_refs(session=session, source_id=source_id, refs=refs)
        if refs:
            date, time_ = max(r.sort_key for r in refs)
            repo.move_cursor(session=session, source_id=source_id, date=date, time=time_)
    result = {"found": len(refs), "new": new, "discovery_queries": counts["queries"]}
    if p.orthanc_url:
        changes = discover_changes(rt, source_id)
        result["new"] += changes["new"]
        result["changed"] = changes["changed"]
    return result


def _discovery_failed(session: Any, *, source_id: int, error: Exception, run_id: int) -> None:
    repo.record_failure(session=session, stage="discover", object_ref=f"source:{source_id}", error=error, run_id=run_id)


def discover_changes(rt: Runtime, source_id: int) -> dict[str, int]:
    """Studies the PACS's change feed (Orthanc's /changes) says became stable since the last look, found
    by UID and registered, whatever their date; the first look only notes where the feed stands."""
    from integrations.orthanc import OrthancChanges

    p = rt.source_settings(source_id)
    assert p.orthanc_url is not None
    auth = (p.username, p.password.get_secret_value()) if p.username else None
    feed = OrthancChanges(url=p.orthanc_url, auth=auth, ca_file=p.tls.ca_file, timeout_s=p.timeout_s)
    try:
        with session_scope(rt.engine) as session:
            source = session.get(PacsSource, source_id)
            assert source is not None
            since = source.changes_seq
        uids: list[str] = []
        if since is None:
            last = feed.last()
        else:
            uids, last = feed.stable_studies_since(since)
    finally:
        feed.close()
    find_study = getattr(rt.source(source_id), "find_study", None)
    refs = [ref for uid in uids if find_study is not None and (ref := find_study(uid)) is not None]
    with session_scope(rt.engine) as session:
        new = register_refs(session=session, source_id=source_id, refs=refs)
        repo.move_changes_seq(session=session, source_id=source_id, seq=last)
    return {"changed": len(uids), "new": new}


@flow(name="nightly", log_prints=False)
def nightly(settings: NightreadSettings | None = None) -> dict[str, Any]:
    """Discover → per study: retrieve → select/render → annotate → record. Returns the run's counts."""
    settings = settings or NightreadSettings()
    logger = get_run_logger()
    started = time.perf_counter()
    flow_run = getattr(get_run_context(), "flow_run", None)
    flow_run_id = str(flow_run.id) if flow_run is not None else None
    counts: Counter[str] = Counter()
    with Runtime.build(settings) as rt:
        throttled = shared_api()
        source_ids = rt.register_sources(throttle=throttled)
        if throttled:
            caps = apply_limits([rt.source_settings(i) for i in source_ids])
            logger.info("PACS association limits for this hour: %s", caps)
        with session_scope(rt.engine) as session:
            recovered = ledger.recover(session=session)
            run_id = repo.start_run(
                session=session,
                kind="nightly",
                flow_run_id=flow_run_id,
                parameters={"sources": [rt.source_settings(i).name for i in source_ids], "owner": ledger.owner()},
            )
            counts["studies_given_up"] = ledger.give_up_exhausted(
                session=session, max_attempts=settings.flow.max_attempts, run_id=run_id
            )
        counts["runs_recovered"], counts["studies_recovered"] = recovered.runs, recovered.studies
        counts["work_folders_removed"] = rt.clean_work()
        status = "failed"
        try:
            if settings.inference.backend == "triton":
                rt.annotator()  # readiness check before anything is retrieved: server up, model ready
            if settings.inference.require_promoted:
                check_promoted(rt)  # before anything is retrieved
            discover = discover_studies.with_options(
                retries=settings.flow.retries, retry_delay_seconds=settings.flow.retry_delay_s
            )
            errors: list[Exception] = []
            for source_id in source_ids:
                try:
                    counts.update(discover(rt, source_id))
                except Exception as exc:  # one unreachable PACS must not stop the others: recorded here
                    errors.append(exc)
                    counts["sources_failed"] += 1
                    rt.record(partial(_discovery_failed, source_id=source_id, error=exc, run_id=run_id))
                    logger.error("discovery in source %s failed: %s", rt.source_settings(source_id).name, exc)
                else:
                    with session_scope(rt.engine) as session:
                        repo.resolve_failures(session=session, stage="discover", object_ref=f"source:{source_id}")
            if errors and len(errors) == len(source_ids):
                raise errors[0]
            pending = rt.record(
                lambda session: [
                    s.id
                    for source_id in source_ids
                    for s in ledger.pending(
                        session=session, max_attempts=settings.flow.max_attempts, source_id=source_id
                    )
                ]
            )
            counts["pending"] = len(pending)
            logger.info("discovered %d studies (%d new); %d to process", counts["found"], counts["new"], len(pending))
            if settings.flow.dispatch == "work_pool":  # studies as runs of annotate-studies on the work pool
                counts.update(dispatch_by_queue(rt, [i for i in pending if i is not None], run_id=run_id))
                rt.check_stop()  # a stop ended the waiting: the run is interrupted (submitted runs go on)
            else:
                futures = [process_study.submit(rt, study_id, run_id) for study_id in pending if study_id is not None]
                try:
                    for future in futures:
                        counts.update(future.result())
                except BaseException:  # SIGTERM, Ctrl-C or a cancellation: stop cleanly, fail nothing
                    status = ledger.INTERRUPTED
                    stop_studies(rt, futures, counts)
                    raise
            failed = counts["studies_failed"] or counts["failed"] or counts["sources_failed"]
            status = "completed_with_failures" if failed else "completed"
        except BaseException as exc:  # a stop before the studies started (or while discovering) is one too
            if not isinstance(exc, Exception) or rt.stopping.is_set():
                rt.stopping.set()
                status = ledger.INTERRUPTED
            raise
        finally:
            result: dict[str, Any] = {**counts, "wall_s": round(time.perf_counter() - started, 2)}
            if rt.model_note:
                result["model_note"] = rt.model_note
            rt.record(lambda session: repo.finish_run(session=session, run_id=run_id, status=status, counts=result))
    result["run_id"] = run_id
    return result


def dispatch_by_queue(rt: Runtime, study_ids: list[int], *, run_id: int) -> Counter[str]:
    """Pushed studies (listen's arrivals) to the `urgent` queue, the rest to `nightly`."""
    from flows.dispatch import dispatch_studies

    def kinds(session: Any) -> dict[int, str]:
        return {
            s.id: rt.source_settings(s.source_id).kind if s.source_id is not None else "dimse"
            for s in (session.get(Study, i) for i in study_ids)
            if s is not None and s.id is not None
        }

    kind = rt.record(kinds)
    urgent = [i for i in study_ids if kind.get(i) == "push"]
    nightly_ = [i for i in study_ids if kind.get(i) != "push"]
    counts: Counter[str] = Counter()
    for queue, ids in (("urgent", urgent), ("nightly", nightly_)):
        if ids:
            counts.update(dispatch_studies(rt, ids, run_id=run_id, work_queue=queue))
    return counts


def stop_studies(rt: Runtime, futures: Sequence[Any], counts: Counter[str]) -> None:
    """A stop: studies not started stay pending; those in flight end at their next checkpoint and are
    abandoned without counting their attempt. Waits for them, so nothing is closed under their feet;
    a second stop while waiting gives up waiting (the next run recovers what is left)."""
    rt.stopping.set()
    get_run_logger().warning("stopping: %d studies in this run end without being failed", len(futures))
    for future in futures:
        future.wait()
        if future.state.is_completed():
            counts.update(future.result())


def run_nightly(settings: NightreadSettings) -> dict[str, Any]:
    """The nightly flow: `flow.concurrency` studies retrieved/rendered at once, and up to
    `flow.annotating_studies` more waiting on the annotator, so a remote model's batches stay full."""
    runner: Any = ThreadPoolTaskRunner(max_workers=settings.flow.concurrency + settings.flow.annotating_studies)
    flow_with_runner = nightly.with_options(task_runner=runner)
    result: dict[str, Any] = flow_with_runner(settings=settings)
    return result
