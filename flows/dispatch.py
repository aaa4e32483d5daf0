"""Studies spread over Prefect workers (`flow.dispatch = work_pool`).

The nightly (or a backfill) discovers and registers studies, then submits runs of the
`annotate-studies` deployment (a few studies each, `flow.studies_per_run`) to the work pool's queue
for its kind of work, at most `flow.runs_in_flight` at once, and waits for the studies rather than
for the runs: the ledger says when each is done or failed. Any number of workers on any number of
machines take the runs; each study is claimed under a lease (db/ledger.py `claim`), so one worker at
a time works on it. A worker that dies stops renewing its leases: once one runs out, its run is
given up and its unfinished studies are submitted again (to whichever worker takes them). A run
that ends with studies still pending (crashed, cancelled) has them submitted again too, as long as
they have attempts left.

Queues: `urgent` (pushed studies) before `nightly` before `backfill` (and reannotate): Prefect's
work-queue priorities (flows/deployments.py creates them), so a worker takes urgent work first.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import Counter, deque
from collections.abc import Sequence
from typing import Any
from uuid import UUID

from sqlmodel import col, select

from db.models import Study, StudyStatus, utcnow
from flows.wiring.runtime import Runtime

log = logging.getLogger(__name__)

DEPLOYMENT = "annotate-studies/annotate-studies"
QUEUES = {"urgent": 1, "nightly": 2, "backfill": 3}  # name → priority (1 first)


def batches(study_ids: Sequence[int], size: int) -> list[list[int]]:
    return [list(study_ids[i : i + size]) for i in range(0, len(study_ids), size)]


def _states(rt: Runtime, study_ids: Sequence[int]) -> dict[int, Study]:
    def read(session: Any) -> dict[int, Study]:
        rows = session.exec(select(Study).where(col(Study.id).in_(list(study_ids)))).all()
        return {s.id: s for s in rows if s.id is not None}

    return rt.record(read)


def _lease_ran_out(study: Study, now: dt.datetime) -> bool:
    until = study.lease_until
    if study.status != StudyStatus.RETRIEVING or until is None:
        return False
    return (until if until.tzinfo else until.replace(tzinfo=dt.UTC)) < now


def _final(study: Study | None) -> bool:
    return study is None or study.status in (StudyStatus.DONE, StudyStatus.FAILED)


def dispatch_studies(
    rt: Runtime, study_ids: Sequence[int], *, run_id: int | None, work_queue: str, poll_s: float = 2.0
) -> Counter[str]:
    """Submit the studies as annotate-studies runs and wait until each is done, failed, or out of
    attempts (see the module docstring). A stop ends the waiting; submitted runs carry on by themselves."""
    from prefect.client.orchestration import get_client

    flow_settings = rt.settings.flow
    todo: deque[list[int]] = deque(batches(study_ids, flow_settings.studies_per_run))
    in_flight: dict[UUID, list[int]] = {}
    counts: Counter[str] = Counter()
    with get_client(sync_client=True) as client:
        # the sync client, not run_deployment: that hands back a coroutine where an event loop runs
        deployment_id = client.read_deployment_by_name(DEPLOYMENT).id
        while todo or in_flight:
            while todo and len(in_flight) < flow_settings.runs_in_flight and not rt.stopping.is_set():
                batch = todo.popleft()
                run = client.create_flow_run_from_deployment(
                    deployment_id,
                    parameters={"study_ids": batch, "run_id": run_id},
                    work_queue_name=work_queue,
                    tags=["nightread"],
                )
                in_flight[run.id] = batch
                counts["flow_runs_submitted"] += 1
            if rt.stopping.wait(poll_s):
                counts["dispatch_stopped"] += 1
                break
            now = utcnow()
            for run_id_, batch in list(in_flight.items()):
                studies = _states(rt, batch)
                unfinished = [i for i in batch if not _final(studies.get(i))]
                if not unfinished:
                    del in_flight[run_id_]  # its studies are settled; the run ends by itself
                    continue
                state = client.read_flow_run(run_id_).state
                if state is not None and state.is_final():
                    del in_flight[run_id_]
                    again = [i for i in unfinished if studies[i].attempts < flow_settings.max_attempts]
                    if again:
                        log.warning(
                            "a run ended (%s) with %d studies unfinished: submitted again", state.type, len(again)
                        )
                        todo.append(again)
                        counts["studies_resubmitted"] += len(again)
                elif any(_lease_ran_out(studies[i], now) for i in unfinished):
                    # its worker stopped renewing: the run is given up, its unfinished studies go again
                    del in_flight[run_id_]
                    log.warning("a worker lost its lease on a study: %d studies submitted again", len(unfinished))
                    todo.append(unfinished)
                    counts["studies_resubmitted"] += len(unfinished)
                    _mark_crashed(client, run_id_)
    final = _states(rt, study_ids)
    counts["studies_done"] += sum(1 for s in final.values() if s.status == StudyStatus.DONE)
    counts["studies_failed"] += sum(1 for s in final.values() if s.status == StudyStatus.FAILED)
    counts["studies_unfinished"] += sum(1 for s in final.values() if not _final(s))
    return counts


def _mark_crashed(client: Any, flow_run_id: UUID) -> None:
    """Tell Prefect a run whose worker is gone has crashed (it would show `Running` for ever)."""
    from prefect.states import Crashed

    try:
        client.set_flow_run_state(flow_run_id, Crashed(message="its worker stopped renewing its leases"), force=True)
    except Exception as exc:  # only bookkeeping in Prefect: the studies are already submitted again
        log.warning("could not mark flow run %s crashed: %s", flow_run_id, type(exc).__name__)
