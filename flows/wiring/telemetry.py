"""Seeing a night: Prometheus metrics (prometheus-client) on nightread's long-running processes.

Counted where the work happens (in the process doing it):
    nightread_retrieval_bytes_total{source}, nightread_retrieval_seconds{source}   per study retrieved
    nightread_inference_seconds, nightread_inference_batch_size                     per annotator call
Read from the database when scraped (the same numbers whichever process is scraped):
    nightread_studies{status}, nightread_failures_open{stage}, nightread_review_queue{state}

`serve_metrics(settings)` starts the endpoint when NIGHTREAD_METRICS__PORT is set; `nightread serve`,
`listen` and `review` call it. Labels carry source names and states, never patient data.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Engine
from sqlmodel import col, func, select

from flows.wiring.settings import NightreadSettings

REGISTRY = CollectorRegistry(auto_describe=True)
RETRIEVAL_BYTES = Counter(
    "nightread_retrieval_bytes", "Bytes of DICOM retrieved from a PACS", ["source"], registry=REGISTRY
)
RETRIEVAL_SECONDS = Histogram(
    "nightread_retrieval_seconds",
    "Time to retrieve one study",
    ["source"],
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800),
    registry=REGISTRY,
)
INFERENCE_SECONDS = Histogram(
    "nightread_inference_seconds",
    "Time of one annotator call (a batch of images)",
    buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120),
    registry=REGISTRY,
)
INFERENCE_BATCH = Histogram(
    "nightread_inference_batch_size", "Images per annotator call", buckets=(1, 2, 4, 8, 16, 32), registry=REGISTRY
)


class DatabaseCollector(Collector):
    """Studies by state, open failures by stage and the review queue, read from the database at most every
    `refresh_s` (a scrape between two readings gets the last one): the queue's counts read every closed
    finding, 2.6 s at a million studies (docs/benchmarks.md, P5), too much for every 15-s scrape."""

    def __init__(self, engine: Engine, *, refresh_s: float = 0.0) -> None:
        self.engine = engine
        self.refresh_s = refresh_s
        self._lock = threading.Lock()
        self._last: tuple[float, list[Any]] | None = None

    def collect(self) -> Iterator[Any]:
        with self._lock:  # one reading at a time; concurrent scrapes wait for it
            now = time.monotonic()
            if self._last is None or now - self._last[0] >= self.refresh_s:
                self._last = (now, list(self._read()))
            families = self._last[1]
        yield from families

    def _read(self) -> Iterator[Any]:
        from db import reviews
        from db.models import Failure, Study
        from db.session import session_scope

        studies = GaugeMetricFamily("nightread_studies", "Studies by state", labels=["status"])
        failures = GaugeMetricFamily("nightread_failures_open", "Unresolved failures by stage", labels=["stage"])
        queue = GaugeMetricFamily("nightread_review_queue", "Closed findings by review state", labels=["state"])
        with session_scope(self.engine) as session:
            for status, n in session.exec(select(Study.status, func.count()).group_by(Study.status)).all():
                studies.add_metric([str(status)], float(n))
            open_failures = select(Failure.stage, func.count()).where(col(Failure.resolved).is_(False))
            for stage, n in session.exec(open_failures.group_by(Failure.stage)).all():
                failures.add_metric([str(stage)], float(n))
            for state, n in reviews.queue_counts(session=session).items():
                queue.add_metric([state], float(n))
        yield from (studies, failures, queue)


_served: dict[int, Any] = {}


def serve_metrics(settings: NightreadSettings, engine: Engine) -> int | None:
    """Start the /metrics endpoint on NIGHTREAD_METRICS__HOST:__PORT (once per process); its port, or
    None when metrics are off."""
    m = settings.metrics
    if m.port is None:
        return None
    if m.port in _served:
        return m.port
    REGISTRY.register(DatabaseCollector(engine, refresh_s=m.database_refresh_s))
    server, _thread = start_http_server(m.port, addr=m.host, registry=REGISTRY)
    port = int(server.server_address[1])
    _served[m.port] = server
    _served[port] = server
    return port
