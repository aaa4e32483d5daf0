"""Throttling a PACS with Prefect's global concurrency limits, shared by every worker of a deployment.

    pacs:<source>          associations with the PACS at once: `max_associations_day`, or within
                           `night_window` `max_associations_night`
    pacs-queries:<source>  queries a minute, when `queries_per_minute` is set (a rate limit: its slots
                           decay)

A run sets the limits for the profile of the hour (`apply_limits`): the day/night switch changes a
limit's value, never deactivates it, so nothing runs unthrottled between the two. Every association
nightread opens with the PACS (C-FIND, C-GET, C-MOVE, C-STORE of a report) holds a slot of its
source's limit while it lasts, and every query takes a slot of its rate limit.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager

from flows.wiring.settings import PacsSettings, parse_window


def shared_api() -> bool:
    """Throttle only against a Prefect API server of its own (PREFECT_API_URL: `nightread serve`, a
    worker, the compose stack). The one-process embedded mode (`run`, `demo`) starts a temporary
    server that forgets its leases when the process is killed, while the slots they held stay counted
    in its database: a SIGKILL there would hold a slot for good and hang every later run (found by
    `make chaos`). That mode runs one process, bounded by NIGHTREAD_FLOW__CONCURRENCY."""
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


def association_limit(source: str) -> str:
    return f"pacs:{source}"


def query_limit(source: str) -> str:
    return f"pacs-queries:{source}"


def night(window: str, at: dt.datetime) -> bool:
    start, end = parse_window(window)
    minute = at.hour * 60 + at.minute
    if start == end:
        return True
    return start <= minute < end if start < end else (minute >= start or minute < end)


def associations_now(p: PacsSettings, at: dt.datetime) -> int:
    """The cap for the profile of `at`'s hour."""
    return p.max_associations_night if night(p.night_window, at) else p.max_associations_day


def apply_limits(sources: Sequence[PacsSettings], *, at: dt.datetime | None = None) -> dict[str, int]:
    """Create or update each DIMSE source's limits for the profile of the hour; returns the caps set."""
    from prefect.client.orchestration import get_client

    at = at or dt.datetime.now()
    caps: dict[str, int] = {}
    with get_client(sync_client=True) as client:
        for p in sources:
            if p.kind != "dimse":
                continue
            caps[p.name] = associations_now(p, at)
            client.upsert_global_concurrency_limit_by_name(association_limit(p.name), caps[p.name])
            if p.queries_per_minute:
                # a bucket of one slot per query, refilled at queries_per_minute / 60 slots a second
                client.upsert_global_concurrency_limit_by_name(
                    query_limit(p.name), max(1, int(p.queries_per_minute)), p.queries_per_minute / 60
                )
    return caps


def association_gate(p: PacsSettings) -> Callable[[], AbstractContextManager[None]]:
    """What a DimseStudySource holds around each association: a slot of pacs:<name>."""
    from prefect.concurrency.sync import concurrency

    name = association_limit(p.name)

    @contextmanager
    def gate() -> Iterator[None]:
        with concurrency(name, occupy=1, strict=True):
            yield

    return gate


def query_gate(p: PacsSettings) -> Callable[[], None] | None:
    """What a DimseStudySource calls before each query (None without a rate)."""
    if not p.queries_per_minute:
        return None
    from prefect.concurrency.sync import rate_limit

    name = query_limit(p.name)
    return lambda: rate_limit(name, strict=True)
