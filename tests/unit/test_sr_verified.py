"""The SRs a study gets, from the database to the PACS: the model's report (`write_report`), then, once
QA has decided every flag, its verified version (`write_verified_report`). Each one passes dciodvfy,
reads back with highdicom, and says exactly what the database holds (0 differences); both are sent to
a real storage SCP (C-STORE) and the first is never changed."""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import EnhancedCTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import Comprehensive3DSRStorage
from sqlmodel import Session, col, select

from db import reviews
from db.migrate import upgrade
from db.models import AppUser, Caption, Finding, Image, ModelVersion, Review, Role, StructuredReport, Study
from flows.rules.questions import Coding, QuestionBank
from flows.wiring.runtime import Runtime
from flows.wiring.settings import NightreadSettings
from flows.writeback import write_report, write_verified_report
from integrations.sample_pacs import generate_studies
from integrations.sr import SrCode, derived_uid, sr_text
from tests.unit.test_sr import check_conformant

pytestmark = pytest.mark.slow  # the Prefect test harness (write_report is a task)

NASTY_CAPTION = "Frontal chest\x00 radiograph\x1b[0m\x07 with\ttabs and a bell\x7f"


@dataclass
class StorageScp:
    """A storage SCP on a free loopback port that keeps what it is sent (our SRs)."""

    ae_title: str = "QAPACS"
    stored: dict[str, Dataset] = field(default_factory=dict)
    port: int = 0

    def __post_init__(self) -> None:
        ae = AE(ae_title=self.ae_title)
        ae.add_supported_context(Comprehensive3DSRStorage)

        def on_store(event: Any) -> int:
            ds = event.dataset
            ds.file_meta = event.file_meta
            self.stored[str(ds.SOPInstanceUID)] = ds
            return 0x0000

        self._server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
        self.port = self._server.server_address[1]

    def stop(self) -> None:
        self._server.shutdown()


@pytest.fixture
def scp() -> Iterator[StorageScp]:
    server = StorageScp()
    try:
        yield server
    finally:
        server.stop()


def _utc(at: dt.datetime) -> str:
    at = at.replace(tzinfo=dt.UTC) if at.tzinfo is None else at.astimezone(dt.UTC)
    return at.strftime("%Y%m%d%H%M%S.%f+0000")


def _code(c: Coding | None) -> SrCode | None:
    return None if c is None else SrCode(c.scheme, c.value, c.meaning)


def db_view(session: Session, bank: QuestionBank, *, study_id: int, model_version_id: int) -> dict[Any, Any]:
    """What the database says of a study's findings by one model version, as the SR should say it: per
    (SOP Instance UID, frame) the caption and each answer with its codes, verdict and comments."""
    images = session.exec(select(Image).where(Image.study_id == study_id)).all()
    by_id = {i.id: i for i in images}
    out: dict[Any, Any] = {}
    for c in session.exec(select(Caption).where(col(Caption.image_id).in_(list(by_id)))).all():
        im = by_id[c.image_id]
        out.setdefault((im.sop_instance_uid, im.frame), {"answers": {}})["caption"] = sr_text(c.text)
    findings = session.exec(
        select(Finding).where(Finding.study_id == study_id, Finding.model_version_id == model_version_id)
    ).all()
    history = reviews.history(session=session, finding_ids=[f.id for f in findings])
    for f in findings:
        im = by_id[f.image_id]
        spec = bank.by_id(f.question_id)
        rows = [(r, name) for r, name in history if r.finding_id == f.id]
        decided = [(r, name) for r, name in rows if r.decision != "comment"]
        verdict = None
        if decided:
            r, name = decided[-1]
            verdict = {
                "decision": r.decision,
                "reviewer": name,
                "corrected_answer": r.to_answer,
                "at": _utc(r.created_at),
            }
        entry = out.setdefault((im.sop_instance_uid, im.frame), {"answers": {}})
        entry.setdefault("caption", None)
        entry["answers"][f.question_id] = {
            "id": f.question_id,
            "question": spec.text,
            "code": _code(spec.code),
            "finding_type": _code(spec.finding_type),
            "finding_site": _code(spec.finding_site),
            "kind": f.kind,
            "answer": f.answer if f.kind == "closed" else sr_text(f.answer),
            "p_yes": f.probability,
            "flagged": f.flagged,
            "verdict": verdict,
            "comments": [
                {"author": name, "text": sr_text(r.comment), "at": _utc(r.created_at)} for r, name in rows if r.comment
            ],
        }
    return out


def differences(read: dict[str, Any], expected: dict[Any, Any]) -> list[str]:
    """Every way the SR read back differs from the database (empty: they agree)."""
    out = []
    if set(read["images"]) != set(expected):
        out.append(f"images: {sorted(read['images'])} != {sorted(expected)}")
    for key in set(read["images"]) & set(expected):
        got, want = read["images"][key], expected[key]
        if got["caption"] != want["caption"]:
            out.append(f"{key} caption: {got['caption']!r} != {want['caption']!r}")
        if set(got["answers"]) != set(want["answers"]):
            out.append(f"{key} questions: {sorted(got['answers'])} != {sorted(want['answers'])}")
        for qid in set(got["answers"]) & set(want["answers"]):
            a, b = got["answers"][qid], want["answers"][qid]
            for name, value in b.items():
                if name == "p_yes":
                    same = (a[name] is None and value is None) or abs(a[name] - value) < 1e-9
                else:
                    same = a[name] == value
                if not same:
                    out.append(f"{key} {qid} {name}: {a[name]!r} != {value!r}")
    return out


def _save(ds: Dataset, path: Path) -> Path:
    if not hasattr(ds, "file_meta") or "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def world(tmp_path, scp):
    """A chest study (frontal, lateral and a 3-frame Enhanced CT, findings on frames 1 and 2) with
    its findings in a fresh database, its files on disk, and a PACS that takes reports back."""
    settings = NightreadSettings(
        data_dir=tmp_path / "data",
        pacs={"name": "qa-pacs", "port": scp.port, "called_ae": scp.ae_title, "write_back": True},
    )
    upgrade(settings.database_url)
    rt = Runtime.build(settings)
    (source_id,) = rt.register_sources()
    chest = next(s for s in generate_studies(seed=3) if s.instances[0].Modality == "CR").instances
    ct = Dataset()
    for element in chest[0]:
        if element.tag.group in (0x0008, 0x0010, 0x0020) and element.keyword != "ImageType":
            ct[element.tag] = copy.deepcopy(element)
    ct.SOPClassUID, ct.Modality, ct.NumberOfFrames, ct.Rows, ct.Columns = EnhancedCTImageStorage, "CT", 3, 16, 16
    ct.SOPInstanceUID = derived_uid("test-enhanced-ct", str(chest[0].SOPInstanceUID))
    ct.SeriesInstanceUID = derived_uid("test-enhanced-ct-series", str(chest[0].SOPInstanceUID))
    sources = {str(ds.SOPInstanceUID): _save(ds, tmp_path / f"{n}.dcm") for n, ds in enumerate([*chest, ct])}
    bank = rt.bank
    with Session(rt.engine) as s:
        study = Study(study_instance_uid=str(chest[0].StudyInstanceUID), source_id=source_id, modalities="CR")
        mv = ModelVersion(
            name="tiny-random-smolvlm",
            revision="abc123",
            backend="local",
            options_hash="0f0f",
            options={"prompt_version": "p1"},
        )
        s.add(study)
        s.add(mv)
        s.flush()

        def image(ds: Dataset, frame: int = 0) -> Image:
            row = Image(
                study_id=study.id,
                sop_instance_uid=str(ds.SOPInstanceUID),
                series_instance_uid=str(ds.SeriesInstanceUID),
                modality=str(ds.Modality),
                frame=frame,
                render_version="r1-512",
                object_key=f"images/{ds.SOPInstanceUID}-{frame}.png",
                sha256="0" * 64,
                width=16,
                height=16,
            )
            s.add(row)
            s.flush()
            return row

        def finding(im: Image, question_id: str, answer: str, p: float | None) -> None:
            q = bank.by_id(question_id)
            flagged = p is not None and q.flag_threshold is not None and p >= q.flag_threshold
            s.add(
                Finding(
                    study_id=study.id,
                    image_id=im.id,
                    model_version_id=mv.id,
                    question_id=question_id,
                    bank_version=bank.version,
                    prompt_version="p1",
                    render_version="r1-512",
                    kind=q.kind,
                    answer=answer,
                    probability=p,
                    flagged=flagged,
                )
            )

        frontal, lateral = image(chest[0]), image(chest[1])
        frame1, frame2 = image(ct, 0), image(ct, 1)
        s.add(
            Caption(
                image_id=frontal.id,
                model_version_id=mv.id,
                prompt_version="p1",
                render_version="r1-512",
                text=NASTY_CAPTION,
            )
        )
        s.add(
            Caption(
                image_id=frame1.id,
                model_version_id=mv.id,
                prompt_version="p1",
                render_version="r1-512",
                text="CT, frame 1.",
            )
        )
        for im in (frontal, lateral):
            finding(im, "pleural_effusion", "yes", 0.8512345678901)
            finding(im, "pneumothorax", "yes" if im is frontal else "no", 0.65 if im is frontal else 0.1)
            finding(im, "cardiomegaly", "no", 0.2)
            finding(im, "xr_impression", "Right\x00 effusion;\x1b thin\trim." if im is frontal else "", None)
        finding(frame1, "ct_lung_nodule", "yes", 0.91)
        finding(frame2, "ct_pleural_effusion", "no", 0.3)
        for name in ("alice", "bob"):
            reviews.add_user(session=s, name=name, role=Role.REVIEWER, password_hash="x")
        s.commit()
        ids = {"study": study.id, "mv": mv.id}
    yield rt, ids, sources, scp
    rt.close()


def _finding(s: Session, study_id: int, sop: str, frame: int, question_id: str) -> int:
    row = s.exec(
        select(Finding.id)
        .join(Image, col(Image.id) == Finding.image_id)
        .where(
            Finding.study_id == study_id,
            Image.sop_instance_uid == sop,
            Image.frame == frame,
            Finding.question_id == question_id,
        )
    ).one()
    return int(row)


def _decide(rt: Runtime, user: str, finding_id: int, decision: str, **kw: str) -> None:
    with Session(rt.engine) as s:
        reviewer = s.exec(select(AppUser).where(AppUser.name == user)).one()
        reviews.decide(session=s, user=reviewer, finding_id=finding_id, decision=decision, **kw)
        s.commit()


def _reports(rt: Runtime) -> list[StructuredReport]:
    with Session(rt.engine) as s:
        return list(s.exec(select(StructuredReport).order_by(col(StructuredReport.id))).all())


def test_first_sr_then_its_verified_version(prefect_harness, world, tmp_path):
    rt, ids, sources, scp = world
    study_id, mv_id = ids["study"], ids["mv"]

    # the model's report: conformant, sent, and exactly the database's findings
    assert write_report(rt, study_id, mv_id, sources) == {"reports": 1, "reports_sent": 1}
    (original,) = _reports(rt)
    raw_original = rt.store.get(original.object_key)
    read = check_conformant(raw_original, tmp_path)
    assert read["verified"] is False
    with Session(rt.engine) as s:
        expected = db_view(s, rt.bank, study_id=study_id, model_version_id=mv_id)
        caption = s.exec(select(Caption.text).where(Caption.text == NASTY_CAPTION)).one()
    for entry in expected.values():
        for answer in entry["answers"].values():
            answer["verdict"], answer["comments"] = None, []
    assert differences(read, expected) == []
    assert caption == NASTY_CAPTION, "the database keeps what the model said"
    ct_sop = next(sop for sop, frame in read["images"] if frame == 1)
    assert read["images"][(ct_sop, 0)]["multi_frame"]
    assert read["images"][(ct_sop, 1)]["multi_frame"]
    assert set(scp.stored) == {original.sop_instance_uid}
    assert write_report(rt, study_id, mv_id, sources) == {"reports": 0, "reports_sent": 0}, "nothing twice"

    # QA decides the flags one by one: no verified version while a flag waits
    frontal = next(sop for sop, _ in read["images"] if sop != ct_sop and read["images"][(sop, 0)]["caption"])
    lateral = next(sop for sop, _ in read["images"] if sop not in (ct_sop, frontal))
    with Session(rt.engine) as s:
        fid = {
            (sop, frame, q): _finding(s, study_id, sop, frame, q)
            for sop, frame, q in [
                (frontal, 0, "pleural_effusion"),
                (frontal, 0, "pneumothorax"),
                (frontal, 0, "xr_impression"),
                (lateral, 0, "pleural_effusion"),
                (ct_sop, 0, "ct_lung_nodule"),
                (ct_sop, 1, "ct_pleural_effusion"),
            ]
        }
    _decide(rt, "alice", fid[frontal, 0, "pleural_effusion"], "confirm")
    _decide(rt, "bob", fid[frontal, 0, "pneumothorax"], "correct", to_answer="no", comment="skin fold\x00, not air")
    result = write_verified_report(rt, study_id)
    assert result == {"verified_reports": 0, "verified_reports_sent": 0, "undecided": 2}
    _decide(rt, "alice", fid[lateral, 0, "pleural_effusion"], "reject", comment="blunted angle is old")
    _decide(rt, "bob", fid[ct_sop, 0, "ct_lung_nodule"], "confirm")
    _decide(rt, "alice", fid[frontal, 0, "xr_impression"], "comment", comment="good summary")
    _decide(rt, "bob", fid[ct_sop, 1, "ct_pleural_effusion"], "correct", to_answer="yes")

    assert write_verified_report(rt, study_id) == {"verified_reports": 1, "verified_reports_sent": 1}
    original_again, verified = _reports(rt)
    assert original_again == original, "the first report's row is unchanged"
    assert rt.store.get(original.object_key) == raw_original, "and so is its file"
    assert (verified.verified, verified.predecessor_id) == (True, original.id)
    assert (verified.model_version_id, verified.bank_version) == (original.model_version_id, original.bank_version)
    raw_verified = rt.store.get(verified.object_key)
    read_verified = check_conformant(raw_verified, tmp_path)
    assert read_verified["verified"] is True
    assert read_verified["verifying_observers"] == [("alice", "nightread"), ("bob", "nightread")]
    assert read_verified["predecessors"] == [original.sop_instance_uid]
    assert read_verified["disclaimer"] == read["disclaimer"]
    assert {k: v["tracking_uid"] for k, v in read_verified["images"].items()} == {
        k: v["tracking_uid"] for k, v in read["images"].items()
    }, "a finding keeps its tracking UID from one version to the next"
    with Session(rt.engine) as s:
        expected = db_view(s, rt.bank, study_id=study_id, model_version_id=mv_id)
    assert differences(read_verified, expected) == []
    effusion = read_verified["images"][(frontal, 0)]["answers"]["pneumothorax"]
    assert effusion["verdict"]["corrected_answer"] == "no"
    assert effusion["comments"][0]["text"] == "skin fold\ufffd, not air"
    ds = dcmread(BytesIO(raw_verified))
    assert ds.VerificationFlag == "VERIFIED"
    assert ds.InstanceNumber == 2
    assert set(scp.stored) == {original.sop_instance_uid, verified.sop_instance_uid}

    # again without a new decision: nothing written, nothing sent
    objects = sorted(rt.store.list("reports/"))
    assert write_verified_report(rt, study_id) == {"verified_reports": 0, "verified_reports_sent": 0}
    assert len(_reports(rt)) == 2
    assert sorted(rt.store.list("reports/")) == objects
    assert len(scp.stored) == 2

    # a new decision: a third version, whose predecessor is the second
    _decide(rt, "alice", fid[ct_sop, 0, "ct_lung_nodule"], "correct", to_answer="no", comment="vessel end-on")
    assert write_verified_report(rt, study_id) == {"verified_reports": 1, "verified_reports_sent": 1}
    *_, third = _reports(rt)
    assert (third.verified, third.predecessor_id) == (True, verified.id)
    read_third = check_conformant(rt.store.get(third.object_key), tmp_path)
    assert read_third["predecessors"] == [verified.sop_instance_uid]
    with Session(rt.engine) as s:
        expected = db_view(s, rt.bank, study_id=study_id, model_version_id=mv_id)
        assert s.exec(select(Review)).all(), "decisions are kept (append-only)"
    assert differences(read_third, expected) == []
    assert read_third["images"][(ct_sop, 0)]["answers"]["ct_lung_nodule"]["verdict"]["reviewer"] == "alice"
    assert hashlib.sha256(rt.store.get(verified.object_key)).digest() == hashlib.sha256(raw_verified).digest()
