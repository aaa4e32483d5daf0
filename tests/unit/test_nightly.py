"""The nightly flow end to end: sample PACS → SQLite + local objects, tiny model, Prefect test harness."""

from __future__ import annotations

import pytest
from sqlmodel import Session, func, select

from db.migrate import upgrade
from db.models import (
    Caption,
    Failure,
    Finding,
    Image,
    ModelVersion,
    PacsSource,
    Run,
    StructuredReport,
    Study,
    StudyIdentity,
)
from db.session import make_engine
from flows.annotate import annotate_study
from flows.nightly import run_nightly
from flows.rules.questions import load_bank
from integrations.imaging import values_of
from integrations.sr import read_sr_findings
from integrations.storage import LocalObjectStore

pytestmark = pytest.mark.slow


def counts(engine) -> dict[str, int]:
    with Session(engine) as s:
        return {
            m.__name__: s.exec(select(func.count()).select_from(m)).one()
            for m in (Study, Image, Caption, Finding, ModelVersion, Failure, Run, StructuredReport)
        }


@pytest.fixture
def settings(make_settings, sample_pacs):
    s = make_settings(pacs={"port": sample_pacs.port, "called_ae": sample_pacs.ae_title})
    upgrade(s.database_url)
    return s


def test_nightly_end_to_end_then_idempotent(prefect_harness, settings):
    engine = make_engine(settings.database_url)
    first = run_nightly(settings)
    assert (first["found"], first["new"], first["retrieved"], first["studies_done"]) == (5, 5, 5, 5)
    c1 = counts(engine)
    # 3 chest frontal + lateral pairs (+2 corrupt frontals that fail), 3 CT + 3 MR representative slices;
    # each CT slice rendered in 3 windows (default, lung for ct_lung_nodule, bone for ct_fracture)
    assert first["rendered"] == 12
    assert c1["Image"] == 6 + 3 * 3 + 3
    assert c1["Caption"] == 12  # one per view: CT captions on the default window only
    with Session(engine) as s:
        findings = s.exec(select(Finding)).all()
        images = {i.id: i for i in s.exec(select(Image)).all()}
        studies = s.exec(select(Study)).all()
        mv = s.exec(select(ModelVersion)).one()
        source = s.exec(select(PacsSource)).one()
        failures = s.exec(select(Failure)).all()
    # chest: 7 closed + 1 open per image; CT chest: 3 closed (each on its window); MR: 2 closed + 1 open
    assert len(findings) == 6 * 8 + 3 * 3 + 3 * 3 == c1["Finding"]
    by_window = {
        q: {images[f.image_id].ct_window for f in findings if f.question_id == q}
        for q in ("ct_pleural_effusion", "ct_lung_nodule", "ct_fracture")
    }
    assert by_window == {"ct_pleural_effusion": {""}, "ct_lung_nodule": {"-600x1500"}, "ct_fracture": {"400x1800"}}
    # chest frontal and lateral recorded as pairs, each pointing at the other
    xr = [i for i in images.values() if i.modality in ("CR", "DX")]
    assert sorted(i.view_role for i in xr) == ["frontal"] * 3 + ["lateral"] * 3
    by_sop = {i.sop_instance_uid: i for i in xr}
    for image in xr:
        partner = by_sop[image.paired_sop_instance_uid]
        assert partner.paired_sop_instance_uid == image.sop_instance_uid
        assert partner.study_id == image.study_id
        assert partner.view_role != image.view_role
    closed = [f for f in findings if f.kind == "closed"]
    assert all(0.0 <= f.probability <= 1.0 for f in closed)
    assert all(f.probability is None for f in findings if f.kind == "open")
    assert all(f.flagged == (f.probability >= _threshold(f.question_id)) for f in closed)
    assert {f.bank_version for f in findings} == {load_bank().version}
    assert all(f.render_version == images[f.image_id].render_version for f in findings)
    assert {i.patient_position for i in images.values() if i.modality in ("CT", "MR")} == {"HFS"}
    assert mv.offline_stand_in
    assert mv.name == "tiny-random-smolvlm"
    assert mv.options["prompt_version"]
    assert all(s.status == "done" for s in studies)
    assert all(s.received_instances == s.expected_instances for s in studies)
    assert source.cursor_date == max(s.study_date for s in studies)
    # the corrupt and pixel-less instances are failures with clear reasons, the rest of the study went on
    reasons = sorted(f.message for f in failures if f.stage == "render")
    assert len(reasons) == 2
    assert "no Pixel Data" in reasons[1]
    assert "could not be decoded" in reasons[0]
    assert first["failed"] == 2
    # objects are in the store under keys without UIDs
    store = LocalObjectStore(settings.storage_root)
    keys = list(store.list("images/"))
    assert len(keys) == c1["Image"]
    uids = {s.study_instance_uid for s in studies} | {i.sop_instance_uid for i in images.values()}
    assert not any(uid in key for key in keys for uid in uids)
    assert all(store.get(i.object_key)[:4] == b"\x89PNG" for i in images.values())

    with Session(engine) as s:
        assert s.exec(select(StudyIdentity)).all() == [], "no patient identifiers stored by default"
    # one SR per study, read back with highdicom: every image with a caption or answers is in it
    with Session(engine) as s:
        reports = s.exec(select(StructuredReport)).all()
    assert len(reports) == 5 == first["reports"]
    for report in reports:
        read = read_sr_findings(store.get(report.object_key))
        study_images = {(i.sop_instance_uid, i.frame) for i in images.values() if i.study_id == report.study_id}
        assert set(read["images"]) == study_images
        answers = sum(len(e["answers"]) for e in read["images"].values())
        assert answers == report.findings == sum(1 for f in findings if f.study_id == report.study_id)
        assert read["algorithm"]["name"] == "tiny-random-smolvlm"
        assert f"question_bank={load_bank().version}" in read["algorithm"]["parameters"]
        assert report.sent_at is None, "write_back is off for this source"

    second = run_nightly(settings)
    assert second["new"] == 0
    assert second.get("retrieved", 0) == 0
    c2 = counts(engine)
    assert {k: v for k, v in c2.items() if k != "Run"} == {k: v for k, v in c1.items() if k != "Run"}
    assert c2["Run"] == c1["Run"] + 1

    # re-running one study's annotation writes nothing twice
    with Session(engine) as s:
        study_id = s.exec(select(Study.id).where(Study.modalities == "CT")).one()
    annotate_study(study_id=study_id, settings=settings)
    c3 = counts(engine)
    assert {k: v for k, v in c3.items() if k != "Run"} == {k: v for k, v in c1.items() if k != "Run"}
    with Session(engine) as s:
        runs = s.exec(select(Run)).all()
    assert [r.status for r in runs] == ["completed_with_failures", "completed"]
    engine.dispose()


def test_reports_are_written_back_once(prefect_harness, make_settings, sample_pacs):
    """write_back on: each study's SR is C-STOREd to the PACS; re-running a study whose findings did not
    change derives the same SOP Instance UID, so nothing new is built or sent."""
    settings = make_settings(
        pacs={"port": sample_pacs.port, "called_ae": sample_pacs.ae_title, "write_back": True},
        review={"show_patient_identifiers": True},
    )
    upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    result = run_nightly(settings)
    assert (result["reports"], result["reports_sent"]) == (5, 5)
    with Session(engine) as s:  # identifiers kept for the review page only because the setting asks for it
        names = {i.patient_name for i in s.exec(select(StudyIdentity)).all()}
    assert names == {str(st.instances[0].PatientName) for st in sample_pacs.archive.studies}
    with Session(engine) as s:
        reports = s.exec(select(StructuredReport)).all()
    assert all(r.sent_at is not None for r in reports)
    stored = {uid: sample_pacs.stored[uid] for uid in (r.sop_instance_uid for r in reports)}
    assert {str(ds.SOPClassUID.name) for ds in stored.values()} == {"Comprehensive 3D SR Storage"}
    assert all("not for clinical use" in ds.SeriesDescription for ds in stored.values())
    before = dict(sample_pacs.stored)
    annotate_study(study_id=reports[0].study_id, settings=settings)
    with Session(engine) as s:
        assert len(s.exec(select(StructuredReport)).all()) == 5
    assert sample_pacs.stored.keys() == before.keys()
    engine.dispose()


def _threshold(question_id: str) -> float:
    t = load_bank().by_id(question_id).flag_threshold
    assert t is not None
    return t


def test_unreachable_pacs_fails_the_run_clearly(prefect_harness, make_settings):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    s = make_settings(pacs={"port": port}, flow={"retries": 0})
    upgrade(s.database_url)
    from integrations.errors import TransientError

    with pytest.raises(TransientError, match=f"127.0.0.1:{port}"):
        run_nightly(s)
    engine = make_engine(s.database_url)
    with Session(engine) as session:
        (run,) = session.exec(select(Run)).all()
    assert run.status == "failed"
    assert run.finished_at is not None
    engine.dispose()


class _OverCountingArchive:
    """Wraps the sample archive so C-FIND announces one instance more than C-GET delivers for CT."""

    def __init__(self, archive):
        self._archive = archive

    def __getattr__(self, name):
        return getattr(self._archive, name)

    def find(self, identifier):
        for ds in self._archive.find(identifier):
            if "NumberOfStudyRelatedInstances" in ds and "CT" in values_of(ds.get("ModalitiesInStudy")):
                ds.NumberOfStudyRelatedInstances = int(ds.NumberOfStudyRelatedInstances) + 1
            yield ds


def test_incomplete_study_is_retried_then_recorded_as_failed(prefect_harness, make_settings, sample_pacs):
    sample_pacs.archive = _OverCountingArchive(sample_pacs.archive)
    s = make_settings(pacs={"port": sample_pacs.port, "modalities": ["CT"]}, flow={"retries": 1, "max_attempts": 2})
    upgrade(s.database_url)
    engine = make_engine(s.database_url)
    first = run_nightly(s)
    assert first["studies_failed"] == 1
    assert first.get("studies_done", 0) == 0
    with Session(engine) as session:
        (study,) = session.exec(select(Study)).all()
        (failure,) = session.exec(select(Failure)).all()
    assert (study.status, study.attempts, study.received_instances) == ("incomplete", 1, 33)
    assert failure.error_class == "RetrievalIncomplete"
    assert "received 33 of 34" in failure.message
    second = run_nightly(s)  # tried again, gives up after max_attempts
    assert second["pending"] == 1
    assert second["studies_failed"] == 1
    with Session(engine) as session:
        study = session.exec(select(Study)).one()
        failure = session.exec(select(Failure)).one()
    assert (study.status, study.attempts, failure.attempts) == ("failed", 2, 2)
    assert run_nightly(s)["pending"] == 0
    engine.dispose()


def test_only_transient_errors_are_retried():
    from prefect.states import Failed

    from flows.annotate import retry_transient
    from integrations.errors import (
        DecodeError,
        Interrupted,
        PeerRefused,
        ProtocolError,
        RetrievalIncomplete,
        TransientError,
    )

    assert retry_transient(None, None, Failed(data=TransientError("busy")))
    assert retry_transient(None, None, Failed(data=RetrievalIncomplete(expected=3, received=2)))
    assert not retry_transient(None, None, Failed(data=PeerRefused("no")))
    assert not retry_transient(None, None, Failed(data=ProtocolError("a PDU longer than negotiated")))
    assert not retry_transient(None, None, Failed(data=Interrupted("stopping")))
    assert not retry_transient(None, None, Failed(data=DecodeError("bad pixels")))
    assert not retry_transient(None, None, Failed(data=ValueError("a bug")))


def test_temperature_scaling():
    from flows.annotate import calibrate

    assert calibrate(0.8, 1.0) == 0.8
    assert 0.5 < calibrate(0.8, 2.0) < 0.8, "T > 1 softens"
    assert calibrate(0.8, 0.5) > 0.8, "T < 1 sharpens"
    assert abs(calibrate(0.2, 2.0) - (1 - calibrate(0.8, 2.0))) < 1e-12
    assert 0.0 < calibrate(0.0, 3.0) < 1e-2
