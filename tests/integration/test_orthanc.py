"""nightread's PACS adapters against Orthanc, a real PACS nobody here wrote: DIMSE and DICOMweb."""

from __future__ import annotations

import datetime as dt

import pytest
from pydicom import dcmread

from integrations.dicomweb import DicomWebStudySource
from integrations.errors import PeerRefused, RetrievalIncomplete
from integrations.pacs import DimseStudySource, _StoreSink

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
SINCE = dt.datetime.combine(dt.date.today() - dt.timedelta(days=7), dt.time())


def dimse(orthanc, **kw) -> DimseStudySource:
    kw.setdefault("calling_ae", orthanc.nightread_ae)
    return DimseStudySource(
        name="orthanc", host="127.0.0.1", port=orthanc.dicom_port, called_ae=orthanc.aet, timeout_s=15, **kw
    )


def dicomweb(orthanc) -> DicomWebStudySource:
    return DicomWebStudySource(name="orthanc-web", url=f"{orthanc.url}/dicom-web")


@pytest.fixture(params=["dimse", "dicomweb"])
def any_source(request, orthanc):
    with dimse(orthanc) if request.param == "dimse" else dicomweb(orthanc) as src:
        yield src


def test_echo(any_source):
    any_source.echo()


def test_find_studies_date_range_and_modalities(any_source, orthanc):
    refs = any_source.find_studies(since=SINCE)
    assert len(refs) == 5
    assert {m for r in refs for m in r.modalities} == {"CR", "DX", "CT", "MR"}
    ct = next(r for r in refs if r.modalities == ("CT",))
    assert ct.number_of_instances == 33
    latest = refs[-1]
    since = dt.datetime.strptime(latest.study_date, "%Y%m%d")
    assert {r.study_instance_uid for r in any_source.find_studies(since=since)} >= {latest.study_instance_uid}
    assert all(r.study_date >= latest.study_date for r in any_source.find_studies(since=since))
    assert {r.modalities for r in any_source.find_studies(since=SINCE, modalities=["DX"])} == {("DX",)}
    assert len(any_source.find_studies(since=SINCE, modalities=["CT", "MR"])) == 2


def test_find_studies_on_one_day_and_time_window(any_source):
    """The backfill's query: one StudyDate, optionally a StudyTime range."""
    refs = any_source.find_studies(since=SINCE)
    day, time = refs[0].study_date, refs[0].study_time[:6]
    on_day = any_source.find_studies_on(date=day)
    assert {r.study_instance_uid for r in on_day} == {r.study_instance_uid for r in refs if r.study_date == day}
    inside = any_source.find_studies_on(date=day, time_range=(time, time))
    assert [r.study_instance_uid for r in inside] == [refs[0].study_instance_uid]
    assert time > "000100", "the synthetic studies are in the morning or later"
    assert any_source.find_studies_on(date=day, time_range=("000000", "000100")) == []


def test_find_series(any_source):
    ct = next(r for r in any_source.find_studies(since=SINCE) if r.modalities == ("CT",))
    series = any_source.find_series(ct.study_instance_uid)
    assert sorted(s.number_of_instances or 0 for s in series) == [1, 32]
    assert {s.modality for s in series} == {"CT"}


@pytest.mark.parametrize("route", ["get", "move", "dicomweb"])
def test_retrieve_a_ct_study(orthanc, tmp_path, route):
    src = dicomweb(orthanc) if route == "dicomweb" else dimse(orthanc, retrieve=route, move_port=orthanc.nightread_port)
    with src:
        ct = next(r for r in src.find_studies(since=SINCE) if r.modalities == ("CT",))
        got = src.retrieve_study(ct.study_instance_uid, dest=tmp_path / route, expected=ct.number_of_instances)
    assert len(got.files) == 33
    ds = dcmread(got.files[0])
    assert ds.StudyInstanceUID == ct.study_instance_uid
    assert ds.pixel_array.shape == (256, 256) or ds.ImageType[2] == "LOCALIZER"


@pytest.mark.parametrize("retrieve", ["get", "move"])
def test_both_receivers_file_the_same_bytes(orthanc, tmp_path, retrieve, monkeypatch):
    """nightread's receive path against pynetdicom's, from a PACS nobody here wrote (C-GET, and C-MOVE
    to our storage SCP: Orthanc names our C-MOVE in each sub-operation, so it is filed without a parse)."""
    parsed = []
    file_by_header = _StoreSink.file
    monkeypatch.setattr(_StoreSink, "file", lambda sink, *a: parsed.append(1) or file_by_header(sink, *a))
    files = {}
    for receiver in ("direct", "pynetdicom"):
        with dimse(orthanc, dimse_receiver=receiver, retrieve=retrieve, move_port=orthanc.nightread_port) as src:
            ct = next(r for r in src.find_studies(since=SINCE) if r.modalities == ("CT",))
            got = src.retrieve_study(ct.study_instance_uid, dest=tmp_path / receiver, expected=ct.number_of_instances)
        files[receiver] = {p.name: p.read_bytes() for p in got.files}
    assert len(files["direct"]) == 33
    assert files["direct"] == files["pynetdicom"]
    assert not list((tmp_path / "direct").glob("*.part"))
    assert parsed == [], "every instance was placed by the C-MOVE it belongs to"


def test_undeclared_ae_title_retrieving_gets_a_clear_error(orthanc, tmp_path):
    with dimse(orthanc) as src:
        ref = src.find_studies(since=SINCE)[0]
    with (
        dimse(orthanc, calling_ae="STRANGER") as src,
        pytest.raises(PeerRefused, match="not declared among their DICOM modalities"),
    ):
        src.retrieve_study(ref.study_instance_uid, dest=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_incomplete_retrieval_detected(orthanc, tmp_path):
    with dimse(orthanc) as src:
        ref = src.find_studies(since=SINCE)[0]
        with pytest.raises(RetrievalIncomplete):
            src.retrieve_study(ref.study_instance_uid, dest=tmp_path, expected=(ref.number_of_instances or 0) + 1)


def test_undeclared_ae_title_gets_a_clear_error(orthanc):
    with (
        dimse(orthanc, calling_ae="STRANGER") as src,
        pytest.raises(PeerRefused, match="not declared among their DICOM modalities"),
    ):
        src.find_studies(since=SINCE)


def test_move_to_undeclared_destination_is_refused(orthanc, tmp_path):
    # Orthanc knows NIGHTREAD but not NIGHTREAD2 as a C-MOVE destination
    with dimse(orthanc, retrieve="move", calling_ae="NIGHTREAD2") as src:
        src.calling_ae = orthanc.nightread_ae  # query as the declared AE ...
        ref = src.find_studies(since=SINCE)[0]
        src.calling_ae = "NIGHTREAD2"  # ... then ask it to move to an unknown one
        with pytest.raises(PeerRefused):
            src.retrieve_study(ref.study_instance_uid, dest=tmp_path)


def test_orthanc_pushes_a_study_to_the_receiver(orthanc, tmp_path):
    """A real PACS sends a study by C-STORE to `nightread listen`'s receiver; it lands in the inbox."""
    import json
    import urllib.request

    from integrations.receiver import StoreReceiver, study_folder

    arrivals = []
    ct = next(s for s in orthanc.studies if s.header.Modality == "CT")
    with StoreReceiver(
        inbox=tmp_path,
        allowed_aes=[orthanc.aet],
        ae_title=orthanc.nightread_ae,
        port=orthanc.nightread_port,
        on_arrival=arrivals.append,
    ):
        (found,) = orthanc.post_json("/tools/lookup", ct.study_instance_uid)
        req = urllib.request.Request(
            f"{orthanc.url}/modalities/nightread/store",
            data=json.dumps({"Resources": [found["ID"]], "Synchronous": True}).encode(),
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            assert r.status == 200
    files = list(study_folder(tmp_path, ct.study_instance_uid).glob("*.dcm"))
    assert len(files) == len(ct.instances)
    assert max(a.received for a in arrivals) == len(ct.instances)
    assert {a.sender_ae for a in arrivals} == {orthanc.aet}
