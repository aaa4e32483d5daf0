"""The nightly flow on the production back ends: Orthanc → Postgres + S3, with the tiny model.

Once per retrieval route: C-GET, C-MOVE to nightread's storage SCP, and DICOMweb (QIDO-RS/WADO-RS).
"""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom import dcmread
from sqlmodel import Session, func, select

from db.migrate import upgrade
from db.models import Caption, Failure, Finding, Image, PacsSource, StructuredReport, Study
from db.session import make_engine
from flows.nightly import run_nightly
from flows.wiring.runtime import build_store
from integrations.sr import read_sr_findings

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]


def source_for(route: str, orthanc) -> dict[str, object]:
    if route == "dicomweb":
        return {"name": "orthanc-web", "kind": "dicomweb", "url": f"{orthanc.url}/dicom-web", "write_back": True}
    return {
        "write_back": True,
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

    # the SRs went back to Orthanc (C-STORE, or STOW-RS for DICOMweb) and read back from it
    with Session(engine) as s:
        reports = s.exec(select(StructuredReport)).all()
    assert (first["reports"], first["reports_sent"], len(reports)) == (5, 5, 5)
    in_orthanc = []
    try:
        for report in reports:
            (found,) = orthanc.post_json(
                "/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": report.sop_instance_uid}}
            )
            in_orthanc.append(found)
            raw = orthanc.get_bytes(f"/instances/{found}/file")
            ours = dcmread(BytesIO(store.get(report.object_key)))
            assert dcmread(BytesIO(raw)) == ours, "the PACS holds the SR we stored (its file meta is its own)"
            read = read_sr_findings(raw)
            assert read["disclaimer"] == "AI generated - not for clinical use"
            assert sum(len(e["answers"]) for e in read["images"].values()) == report.findings

        second = run_nightly(settings)
        assert second["new"] == 0
        assert second.get("retrieved", 0) == 0
        assert second.get("reports_sent", 0) == 0
        assert {k: v for k, v in table_counts(engine).items()} == c1
        assert sorted(store.list("images/")) == keys
    finally:  # leave Orthanc as the fixture seeded it for the other tests
        for instance in in_orthanc:
            orthanc.delete(f"/instances/{instance}")
    engine.dispose()
