"""The nightly flow on the production back ends: Orthanc → Postgres + S3, with the tiny model.

Once per retrieval route: C-GET, C-MOVE to nightread's storage SCP, and DICOMweb (QIDO-RS/WADO-RS).
"""

from __future__ import annotations

import pytest
from sqlmodel import Session, func, select

from db.migrate import upgrade
from db.models import Caption, Failure, Finding, Image, PacsSource, Study
from db.session import make_engine
from flows.nightly import run_nightly
from flows.runtime import build_store

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]


def source_for(route: str, orthanc) -> dict[str, object]:
    if route == "dicomweb":
        return {"name": "orthanc-web", "kind": "dicomweb", "url": f"{orthanc.url}/dicom-web"}
    return {
        "name": f"orthanc-{route}",
        "kind": "dimse",
        "host": "127.0.0.1",
        "port": orthanc.dicom_port,
        "called_ae": orthanc.aet,
        "calling_ae": orthanc.nightread_ae,
        "retrieve": route,
        "move_port": orthanc.nightread_port,
    }


def table_counts(engine) -> dict[str, int]:
    with Session(engine) as s:
        return {
            m.__name__: s.exec(select(func.count()).select_from(m)).one()
            for m in (Study, Image, Caption, Finding, Failure)
        }


@pytest.mark.parametrize("route", ["get", "move", "dicomweb"])
def test_nightly_on_orthanc_postgres_s3(prefect_harness, make_settings, orthanc, postgres_url, s3_settings, route):
    settings = make_settings(database={"url": postgres_url}, storage=s3_settings, pacs=source_for(route, orthanc))
    upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    first = run_nightly(settings)
    assert first["new"] == 5
    assert first["studies_done"] == 5
    c1 = table_counts(engine)
    assert c1["Study"] == 5
    # 3 chest frontal + lateral pairs, 3 CT slices in 3 windows each, 3 MR slices; 2 corrupt frontals fail
    assert c1["Image"] == 6 + 3 * 3 + 3
    assert c1["Caption"] == 12
    assert c1["Finding"] == 6 * 8 + 3 * 3 + 3 * 3
    assert c1["Failure"] == 2
    with Session(engine) as s:
        images = s.exec(select(Image)).all()
        studies = s.exec(select(Study)).all()
        source = s.exec(select(PacsSource)).one()
    assert all(st.received_instances == st.expected_instances for st in studies)
    assert source.kind == ("dicomweb" if route == "dicomweb" else "dimse")
    assert source.cursor_date == max(st.study_date for st in studies)
    store = build_store(settings)
    keys = sorted(store.list("images/"))
    assert keys == sorted(i.object_key for i in images)
    assert all(store.get(k)[:8] == b"\x89PNG\r\n\x1a\n" for k in keys)

    second = run_nightly(settings)
    assert second["new"] == 0
    assert second.get("retrieved", 0) == 0
    assert table_counts(engine) == c1
    assert sorted(store.list("images/")) == keys
    engine.dispose()
