"""nightread's deployments on a Prefect server with a work pool (`nightread deploy`), for any number of
workers (`prefect worker start --pool nightread`) sharing Postgres and the object store.

    work pool `nightread` (process workers), queues by priority: urgent 1, nightly 2, backfill 3
    nightly           cron, queue nightly: discovers, registers, then submits annotate-studies runs
    annotate-studies  queue nightly (dispatch chooses the queue per run: urgent, nightly, backfill)
    backfill          queue backfill;  reannotate  queue backfill

The deployments run the flows from this installation's source folder (the same path on every worker:
a container image, or a shared checkout). Settings come from each worker's environment (NIGHTREAD_*),
never from parameters: set `NIGHTREAD_FLOW__DISPATCH=work_pool` there. `deploy/prefect.yaml` describes
the same deployments for `prefect deploy`; a test keeps the two in step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.dispatch import QUEUES

SOURCE = Path(__file__).resolve().parents[1]  # the folder holding flows/, integrations/, db/


@dataclass(frozen=True)
class DeploymentSpec:
    name: str
    entrypoint: str
    queue: str
    cron: str | None = None
    concurrency_limit: int | None = None
    description: str = ""


DEPLOYMENTS = (
    DeploymentSpec(
        "nightly",
        "flows/nightly.py:nightly",
        "nightly",
        cron="0 1 * * *",
        concurrency_limit=1,
        description="Discover new studies in every enabled source and annotate them.",
    ),
    DeploymentSpec(
        "annotate-studies",
        "flows/annotate.py:annotate_studies",
        "nightly",
        description="A worker's share of a run: studies claimed under a lease, each end to end.",
    ),
    DeploymentSpec(
        "backfill",
        "flows/backfill.py:backfill",
        "backfill",
        concurrency_limit=1,
        description="Studies from start_date to end_date in one source, resumable.",
    ),
    DeploymentSpec(
        "reannotate",
        "flows/reannotate.py:reannotate",
        "backfill",
        concurrency_limit=1,
        description="A model or question bank over stored images of a cohort, without the PACS.",
    ),
)


def ensure_pool(client: Any, pool: str) -> None:
    """The process work pool and its queues with their priorities (created, or their priority set)."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    try:
        client.read_work_pool(pool)
    except ObjectNotFound:
        template = ProcessWorker.get_default_base_job_template()
        client.create_work_pool(WorkPoolCreate(name=pool, type="process", base_job_template=template))
    for name, priority in QUEUES.items():
        try:
            client.create_work_queue(name=name, work_pool_name=pool, priority=priority)
        except ObjectAlreadyExists:
            queue = client.read_work_queue_by_name(name=name, work_pool_name=pool)
            if queue.priority != priority:
                client.update_work_queue(queue.id, priority=priority)


def deploy(*, pool: str = "nightread", timezone: str = "UTC", source: Path = SOURCE) -> list[str]:
    """Create or update the pool, its queues and the deployments on the Prefect API of this environment
    (PREFECT_API_URL); returns the deployments' full names."""
    from prefect import Flow
    from prefect.client.orchestration import get_client
    from prefect.schedules import Cron

    with get_client(sync_client=True) as client:
        ensure_pool(client, pool)
    names = []
    for spec in DEPLOYMENTS:
        # _sync: Prefect's async_dispatch hands back a coroutine when an event loop runs in this thread
        flow: Any = Flow.from_source(source=str(source), entrypoint=spec.entrypoint, _sync=True)  # type: ignore[call-arg]
        flow.deploy(
            name=spec.name,
            work_pool_name=pool,
            work_queue_name=spec.queue,
            schedule=Cron(spec.cron, timezone=timezone) if spec.cron else None,
            concurrency_limit=spec.concurrency_limit,
            description=spec.description,
            enforce_parameter_schema=False,
            build=False,
            push=False,
            print_next_steps=False,
            ignore_warnings=True,
            _sync=True,
        )
        names.append(f"{flow.name}/{spec.name}")
    return names
