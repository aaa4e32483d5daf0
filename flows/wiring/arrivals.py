"""Wiring for `nightread listen`: the C-STORE receiver's arrivals become rows the next run reads."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Engine

from db import repository as repo
from db.migrate import upgrade
from db.session import make_engine, session_scope
from flows.wiring.runtime import source_row
from flows.wiring.settings import NightreadSettings
from integrations.receiver import Arrival


def make_arrival_recorder(settings: NightreadSettings) -> tuple[Callable[[Arrival], None], Engine]:
    """(callback for StoreReceiver, engine): each pushed instance is counted on its study's row."""
    upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    push = settings.push_source()
    with session_scope(engine) as session:
        source_id = repo.upsert_source(session=session, **source_row(push)).id
    assert source_id is not None

    def record(arrival: Arrival) -> None:
        with session_scope(engine) as session:
            repo.record_arrival(
                session=session,
                source_id=source_id,
                study_instance_uid=arrival.study_instance_uid,
                received=arrival.received,
                study_date=arrival.study_date,
                study_time=arrival.study_time,
                modality=arrival.modality,
                accession_number=arrival.accession_number,
            )

    return record, engine
