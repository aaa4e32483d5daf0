"""Secrets never leave the settings: every flow that takes settings runs under Prefect with a database
password (the real Postgres), an S3 secret key (the real S3 server), a review key and a
de-identification key, one PACS unreachable so error paths run too; then Prefect's database (flow-run
parameters, states, logs, every table), the log records, stderr and nightread's own database are
searched for each secret."""

from __future__ import annotations

import datetime as dt
import logging
import secrets
import socket

import pytest
from sqlmodel import Session, select

from db.migrate import upgrade
from db.models import Run, Study
from db.session import make_engine
from flows.annotate import annotate_study
from flows.backfill import run_backfill
from flows.nightly import run_nightly
from flows.reannotate import reannotate
from flows.wiring.settings import NightreadSettings
from tests.leak_scan import (
    database_texts,
    find,
    flush_prefect_logs,
    log_texts,
    prefect_database,
    prefect_logs_stored,
    sqlite_texts,
)
from tests.services import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_no_secret_in_prefect_logs_or_errors(
    prefect_harness, make_settings, sample_pacs, postgres_url, s3_settings, caplog, capfd
):
    secret = {k: f"{k}{secrets.token_hex(16)}" for k in ("dbpassword", "s3secret", "reviewkey", "deidkey")}
    url = postgres_url.replace("://postgres@", f"://postgres:{secret['dbpassword']}@")
    assert secret["dbpassword"] in url  # the test server trusts loopback: any password gets in
    settings: NightreadSettings = make_settings(
        database={"url": url},
        storage={**s3_settings, "secret_key": secret["s3secret"]},
        review={"secret_key": secret["reviewkey"]},
        deid_secret_key=secret["deidkey"],
        sources=[
            {"name": "sample", "port": sample_pacs.port, "called_ae": sample_pacs.ae_title},
            {"name": "down", "port": closed_port(), "timeout_s": 2},
        ],
        flow={"retries": 0},
    )
    caplog.set_level(logging.DEBUG, logger="prefect")  # every run log line reaches the API, not just warnings
    caplog.set_level(logging.INFO)
    upgrade(settings.database_url)
    engine = make_engine(settings.database_url)

    nightly = run_nightly(settings)
    assert (nightly["sources_failed"], nightly["studies_done"]) == (1, 5)
    with Session(engine) as s:
        study_id = s.exec(select(Study.id).where(Study.modalities == "MR")).one()
        first, last = min(st.study_date for st in s.exec(select(Study)).all()), dt.date.today()
    annotate_study(study_id=study_id, settings=settings)
    reannotate(where="", settings=settings)
    start = f"{first[:4]}-{first[4:6]}-{first[6:]}"
    run_backfill(settings, start_date=start, end_date=f"{last:%Y-%m-%d}", source="sample")
    with Session(engine) as s:
        nightly_run = s.exec(select(Run).where(Run.kind == "nightly")).one()
    assert nightly_run.flow_run_id is not None

    flush_prefect_logs()
    db = prefect_database()
    wait_until(
        lambda: prefect_logs_stored(db, nightly_run.flow_run_id or "", "discovery in source down failed"),
        timeout=60,
        what="the nightly run's logs in Prefect's database",
    )
    prefect_texts = list(sqlite_texts(db))
    params = [t for where, t in prefect_texts if where.endswith("flow_run.parameters")]
    assert any('"deid_secret_key": "**********"' in p for p in params), "settings are parameters, secrets masked"

    texts = [
        *prefect_texts,
        *log_texts(caplog.records),
        ("stderr", capfd.readouterr().err),
        *database_texts(engine),
    ]
    assert len(texts) > 100
    hits = find(texts, secret.values())
    assert not hits, "\n".join(map(str, hits))
    engine.dispose()
