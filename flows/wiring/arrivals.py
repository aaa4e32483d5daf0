"""Wiring for `nightread listen`: the C-STORE receiver's arrivals become rows the next run reads."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Engine

from db import repository as repo
from db.session import session_scope
from flows.wiring.runtime import source_row
from flows.wiring.settings import NightreadSettings
from integrations.receiver import Arrival


def make_arrival_recorder(settings: NightreadSettings, engine: Engine) -> Callable[[Arrival], None]:
    """The StoreReceiver's callback: each pushed instance is counted on its study's row (in the database
    of `engine`, whose schema the caller has checked: nothing here migrates)."""
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

    return record
