"""A study archived late with a date before the discovery cursor (an outside study, a modality's
backlog, a corrected date) is found by the next night: discovery re-queries `requery_days` before its
cursor and registers idempotently (with `requery_days=0` it would be missed), and a PACS's change feed
(Orthanc's /changes) finds one dated before the window too. Against a real Orthanc."""

from __future__ import annotations

import datetime as dt
import shutil
import time
from collections.abc import Iterator

import pytest
from sqlmodel import select

from db.migrate import upgrade
from db.models import PacsSource, Study
from db.session import session_scope
from flows.nightly import discover_studies
from flows.wiring.runtime import Runtime
from integrations.sample_pacs import generate_studies
from tests.conftest import require_or_skip
from tests.services import DICOMWEB_PLUGIN, ORTHANC, Orthanc

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
TODAY = dt.date.today()


@pytest.fixture
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    if ORTHANC is None or not DICOMWEB_PLUGIN.exists():
        require_or_skip("Orthanc with the DICOMweb plugin (apt-get install orthanc orthanc-dicomweb)")
    folder = tmp_path_factory.mktemp("orthanc-late")
    server = Orthanc.on_free_ports(folder)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize(("requery_days", "found_late"), [(7, True), (0, False)])
def test_a_late_arrival_with_an_earlier_date_is_found_next_night(
    orthanc, make_settings, requery_days, found_late
) -> None:
    studies = generate_studies(seed=31, today=TODAY, xr_size=64, ct_size=32, ct_slices=4)
    by_date = sorted(studies, key=lambda s: (s.header.StudyDate, s.header.StudyTime))
    late, newest = by_date[0], by_date[-1]
    assert late.header.StudyDate < newest.header.StudyDate
    orthanc.upload_datasets(ds for s in studies if s is not late for ds in s.instances)
    settings = make_settings(
        sources=[
            {"name": "orthanc", "kind": "dimse", "host": "127.0.0.1", "port": orthanc.dicom_port,
             "called_ae": orthanc.aet, "calling_ae": orthanc.nightread_ae, "requery_days": requery_days,
             "lookback_days": 9}
        ]
    )  # fmt: skip
    upgrade(settings.database_url)
    with Runtime.build(settings) as rt:
        (source_id,) = rt.register_sources()
        first = discover_studies.fn(rt, source_id)
        assert first["new"] == len(studies) - 1
        with session_scope(rt.engine) as session:
            source = session.get(PacsSource, source_id)
            assert source is not None
            assert source.cursor_date == newest.header.StudyDate, "the cursor is past the late study's date"
        orthanc.upload_datasets(late.instances)  # archived after the first night, dated before the cursor
        second = discover_studies.fn(rt, source_id)
        with session_scope(rt.engine) as session:
            registered = set(session.exec(select(Study.study_instance_uid)).all())
    assert (late.study_instance_uid in registered) is found_late
    assert second["new"] == (1 if found_late else 0), "the studies seen before are not registered twice"


def test_orthancs_change_feed_finds_a_late_study_outside_the_requery_window(
    tmp_path_factory: pytest.TempPathFactory, make_settings
) -> None:
    """A study dated a month back, archived after the first night: the re-query window (7 days) cannot see
    it, Orthanc's /changes can. The first look only notes where the feed stands."""
    if ORTHANC is None or not DICOMWEB_PLUGIN.exists():
        require_or_skip("Orthanc with the DICOMweb plugin (apt-get install orthanc orthanc-dicomweb)")
    folder = tmp_path_factory.mktemp("orthanc-changes")
    server = Orthanc.on_free_ports(folder, extra_config={"StableAge": 1})
    server.start()
    try:
        recent = generate_studies(seed=41, today=TODAY, xr_size=64, ct_size=32, ct_slices=4)[:2]
        (old,) = generate_studies(seed=42, today=TODAY - dt.timedelta(days=30), xr_size=64, ct_size=32, ct_slices=4)[:1]
        server.upload_datasets(ds for s in recent for ds in s.instances)
        settings = make_settings(
            sources=[
                {"name": "orthanc", "kind": "dimse", "host": "127.0.0.1", "port": server.dicom_port,
                 "called_ae": server.aet, "calling_ae": server.nightread_ae, "lookback_days": 9,
                 "orthanc_url": server.url}
            ]
        )  # fmt: skip
        upgrade(settings.database_url)
        with Runtime.build(settings) as rt:
            (source_id,) = rt.register_sources()
            first = discover_studies.fn(rt, source_id)
            assert (first["new"], first["changed"]) == (2, 0), "the first look reads no history"
            server.upload_datasets(old.instances)
            deadline = time.monotonic() + 60
            found = 0
            while not found:  # Orthanc calls a study stable StableAge (1 s) after its last instance
                assert time.monotonic() < deadline, "the late study never came through the change feed"
                time.sleep(0.5)
                found = discover_studies.fn(rt, source_id)["new"]
            with session_scope(rt.engine) as session:
                registered = set(session.exec(select(Study.study_instance_uid)).all())
                source = session.get(PacsSource, source_id)
                assert source is not None
                assert source.changes_seq is not None
            again = discover_studies.fn(rt, source_id)
        assert old.study_instance_uid in registered
        assert found == 1
        assert again["new"] == 0, "a change read once is not read again"
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)
