"""Seeing a night: after a nightly, the Prometheus endpoint shows studies by state, retrieval bytes and
seconds, inference latency and batch size, open failures by stage and the review queue."""

from __future__ import annotations

import re
import urllib.request

import pytest

from db.migrate import upgrade
from db.session import make_engine
from flows.nightly import run_nightly
from flows.wiring.telemetry import REGISTRY, serve_metrics

pytestmark = pytest.mark.slow


def value(text: str, name: str, labels: str = "") -> float:
    pattern = re.escape(name) + (re.escape("{" + labels + "}") if labels else r"(\{[^}]*\})?") + r" ([0-9.e+-]+)"
    match = re.search(f"^{pattern}$", text, re.MULTILINE)
    assert match is not None, f"{name}{{{labels}}} not in the metrics"
    return float(match.groups()[-1])


def test_a_night_is_visible_on_the_metrics_endpoint(prefect_harness, make_settings, sample_pacs) -> None:
    settings = make_settings(pacs={"port": sample_pacs.port, "called_ae": sample_pacs.ae_title}, metrics={"port": 0})
    upgrade(settings.database_url)
    source = {"source": "sample-pacs"}

    def counted() -> tuple[float, float, float, float]:  # counters live for the process: compare deltas
        names = ("nightread_retrieval_bytes_total", "nightread_retrieval_seconds_count")
        per_source = [REGISTRY.get_sample_value(n, source) or 0.0 for n in names]
        overall = [
            REGISTRY.get_sample_value(n) or 0.0
            for n in ("nightread_inference_seconds_count", "nightread_inference_batch_size_sum")
        ]
        return per_source[0], per_source[1], overall[0], overall[1]

    before = counted()
    run_nightly(settings)
    after = counted()
    retrieved_bytes, retrievals, calls, images = (a - b for a, b in zip(after, before, strict=True))
    assert retrieved_bytes > 1_000_000
    assert retrievals == 5
    assert calls >= 5
    assert images >= 12  # every rendered image was annotated
    engine = make_engine(settings.database_url)
    port = serve_metrics(settings, engine)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert value(text, "nightread_studies", 'status="done"') == 5
    assert value(text, "nightread_retrieval_bytes_total", 'source="sample-pacs"') >= retrieved_bytes
    assert value(text, "nightread_retrieval_seconds_count", 'source="sample-pacs"') >= 5
    assert value(text, "nightread_inference_seconds_count") >= calls
    failures = re.findall(r'^nightread_failures_open\{stage="(\w+)"\} ([0-9.]+)$', text, re.MULTILINE)
    assert sum(float(n) for _, n in failures) == 2, failures  # the sample PACS's two corrupt frontals
    assert value(text, "nightread_review_queue", 'state="pending"') > 0
    assert "PATIENT" not in text, "labels carry states and source names, never patient data"
    engine.dispose()


def test_the_database_is_read_at_most_once_a_refresh(tmp_path, monkeypatch) -> None:
    """Scrapes within `metrics.database_refresh_s` get the last reading; after it, a new one."""
    from prometheus_client import CollectorRegistry, generate_latest

    from flows.wiring import telemetry

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    engine = make_engine(url)
    clock = [1000.0]
    monkeypatch.setattr(telemetry.time, "monotonic", lambda: clock[0])
    readings: list[int] = []
    read = telemetry.DatabaseCollector._read

    def counted(self):  # type: ignore[no-untyped-def]
        readings.append(1)
        return read(self)

    monkeypatch.setattr(telemetry.DatabaseCollector, "_read", counted)
    registry = CollectorRegistry()
    registry.register(telemetry.DatabaseCollector(engine, refresh_s=60))
    first = generate_latest(registry)
    clock[0] += 59
    assert generate_latest(registry) == first
    assert len(readings) == 1, "a scrape inside the refresh reads nothing"
    clock[0] += 1
    generate_latest(registry)
    assert len(readings) == 2, "the next one after it reads again"
    assert b"nightread_review_queue" in first
    engine.dispose()
