"""A study's findings as DICOM SR (IHE AI Results: TID 1500, integrations/sr.py): built with highdicom,
kept in the object store, recorded in the database and, when the source's `write_back` is on, sent
back to the PACS.

Two kinds of report, never changed once written:
- `write_report`: the model's findings of a study, model version and question bank version
  (VerificationFlag UNVERIFIED). Its SOP Instance UID comes from its content: re-running a study
  whose findings did not change yields the same UID, finds the row, and sends nothing twice; a new
  model or question bank version gives a new SR beside the old one.
- `write_verified_report`: once QA has decided every flagged finding of a study, a new version of
  each of its reports carrying the reviewers' verdicts and comments (VerificationFlag VERIFIED, the
  reviewers as Verifying Observers, the previous version as its predecessor). The same decisions
  give the same UID: calling it again without new decisions writes nothing."""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Mapping
from io import BytesIO
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydicom import Dataset, dcmread
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from db import repository as repo
from db import reviews
from db.models import AppUser, Decision, Finding, Image, ModelVersion, Review, StructuredReport, Study, utcnow
from db.session import session_scope
from flows.rules.questions import Coding, QuestionBank
from flows.wiring.runtime import Runtime
from flows.wiring.settings import NightreadSettings
from integrations.errors import ConfigurationError, PermanentError
from integrations.ports import WritableSource
from integrations.sr import (
    GENERIC_QUESTION,
    BuiltSr,
    SrAnswer,
    SrCode,
    SrComment,
    SrImage,
    SrProvenance,
    SrVerdict,
    SrVerification,
    build_sr,
    evidence_of_report,
    images_of_report,
    library_of_report,
    nightread_version,
    provenance_of_report,
    read_sr_findings,
    with_verdicts,
)

log = logging.getLogger(__name__)
DEFAULT_ORGANIZATION = "nightread"
VERDICT_DECISIONS = (Decision.CONFIRM, Decision.REJECT, Decision.CORRECT)


def report_key(*, study_uid: str, sop_uid: str) -> str:
    study = repo.pseudonym(study_uid, namespace="study")[:20]
    return f"reports/{study}/{repo.pseudonym(sop_uid, namespace='sop')[:20]}.dcm"


def model_version_key(mv: ModelVersion) -> str:
    """What makes a model version unique: its SR series and device UID derive from it."""
    return f"{mv.name}@{mv.revision}/{mv.backend}/{mv.options_hash}"


def _headers(sources: Mapping[str, Path], wanted: set[str]) -> dict[str, Any]:
    """The headers (no pixels) of the wanted instances, read from the files they came in."""
    out: dict[str, Any] = {}
    for uid in sorted(wanted & set(sources)):
        try:
            out[uid] = dcmread(sources[uid], stop_before_pixels=True, force=True)
        except Exception:  # unreadable files already have their failure row from rendering
            continue
    return out


def _sr_code(c: Coding | None) -> SrCode | None:
    return None if c is None else SrCode(c.scheme, c.value, c.meaning)


def sr_answer(f: Finding, bank: QuestionBank) -> SrAnswer:
    """A finding row as an SR answer, with the codes its question has in `bank` (a question the bank
    no longer has keeps its id and gets the generic 99NIGHTREAD code)."""
    try:
        spec = bank.by_id(f.question_id)
    except KeyError:
        return SrAnswer(
            question_id=f.question_id,
            question_text=f.question_id,
            kind=f.kind,
            answer=f.answer,
            p_yes=f.probability,
            flagged=f.flagged,
            code=SrCode(*GENERIC_QUESTION),
        )
    code = _sr_code(spec.code)
    assert code is not None
    return SrAnswer(
        question_id=f.question_id,
        question_text=spec.text,
        kind=f.kind,
        answer=f.answer,
        p_yes=f.probability,
        flagged=f.flagged,
        code=code,
        finding_type=_sr_code(spec.finding_type),
        finding_site=_sr_code(spec.finding_site),
    )


def _send(rt: Runtime, source_id: int, report: StructuredReport) -> bool:
    """C-STORE (or STOW-RS) the report to its study's source when that source writes back; True if sent."""
    try:
        settings = rt.source_settings(source_id)
    except ConfigurationError:  # a runtime that has not met its sources yet (the review app's)
        rt.register_sources()
        settings = rt.source_settings(source_id)
    if not settings.write_back:
        return False
    source = rt.source(source_id)
    if not isinstance(source, WritableSource):
        raise ConfigurationError(f"source {settings.name!r} cannot take objects back")
    source.store_instances([dcmread(BytesIO(rt.store.get(report.object_key)))])
    with session_scope(rt.engine) as session:
        row = session.get(StructuredReport, report.id)
        assert row is not None
        row.sent_at = utcnow()
        session.add(row)
    return True


def _keep(
    rt: Runtime, *, built: BuiltSr, study_uid: str, source_id: int | None, values: Mapping[str, Any]
) -> tuple[StructuredReport, int, int]:
    """Store and record a built report unless its SOP Instance UID is known; send it if its source
    writes back and it was not sent yet. Returns (row, written 0/1, sent 0/1)."""
    key = report_key(study_uid=study_uid, sop_uid=built.sop_instance_uid)
    with session_scope(rt.engine) as session:
        known = session.exec(
            select(StructuredReport).where(StructuredReport.sop_instance_uid == built.sop_instance_uid)
        ).first()
    written = 0
    if known is None:
        rt.store.put(key, built.to_bytes(), content_type="application/dicom")
        with session_scope(rt.engine) as session:
            known = repo.record_report(
                session=session,
                values={
                    **values,
                    "sop_instance_uid": built.sop_instance_uid,
                    "series_instance_uid": built.series_instance_uid,
                    "content_sha": built.content_sha,
                    "object_key": key,
                    "created_at": utcnow(),
                },
            )
        written = 1
    sent = int(source_id is not None and known.sent_at is None and _send(rt, source_id, known))
    return known, written, sent


@task(name="write-report", cache_policy=NO_CACHE)
def write_report(rt: Runtime, study_id: int, model_version_id: int, sources: Mapping[str, Path]) -> dict[str, int]:
    """Build (or find) the study's SR for this model and bank version; send it if asked to."""
    logger = get_run_logger()
    bank = rt.bank
    with session_scope(rt.engine) as session:
        study = session.get(Study, study_id)
        mv = session.get(ModelVersion, model_version_id)
        assert study is not None
        assert mv is not None
        inputs = repo.report_inputs(
            session=session, study_id=study_id, model_version_id=model_version_id, bank_version=bank.version
        )
        study_uid, source_id = study.study_instance_uid, study.source_id
        provenance = SrProvenance(
            model_name=mv.name,
            model_revision=mv.revision,
            model_backend=mv.backend,
            model_version_key=model_version_key(mv),
            bank_version=bank.version,
            prompt_version=str(mv.options.get("prompt_version", "")),
            nightread_version=nightread_version(),
        )
    # CT slices rendered in several windows are one source image: their answers go together
    grouped: dict[tuple[str, int], dict[str, Any]] = defaultdict(lambda: {"caption": None, "answers": []})
    for image, caption, findings in inputs:
        if caption is None and not findings:
            continue
        entry = grouped[(image.sop_instance_uid, image.frame)]
        entry["render_version"] = entry.get("render_version") or image.render_version
        if caption is not None:
            entry["caption"], entry["render_version"] = caption.text, image.render_version
        entry["answers"].extend(sr_answer(f, bank) for f in findings)
    if not grouped:
        return {}
    headers = _headers(sources, {sop for sop, _ in grouped})
    images = [
        SrImage(
            sop_class_uid=str(headers[sop].SOPClassUID),
            sop_instance_uid=sop,
            frame=frame,
            render_version=entry["render_version"],
            caption=entry["caption"],
            answers=tuple(entry["answers"]),
            multi_frame=int(headers[sop].get("NumberOfFrames") or 1) > 1,
        )
        for (sop, frame), entry in grouped.items()
        if sop in headers
    ]
    built = build_sr(evidence=list(headers.values()), images=images, provenance=provenance)
    row, written, sent = _keep(
        rt,
        built=built,
        study_uid=study_uid,
        source_id=source_id,
        values={
            "study_id": study_id,
            "model_version_id": model_version_id,
            "bank_version": bank.version,
            "images": len(images),
            "findings": sum(len(i.answers) for i in images),
        },
    )
    if sent:
        logger.info("study %d: SR %d sent to the PACS", study_id, row.id)
    return {"reports": written, "reports_sent": sent}


# --- the QA verdicts as a verified version -----------------------------------------------------------


def _chains(session: Session, study_id: int) -> list[tuple[StructuredReport, StructuredReport]]:
    """(the model's report, its latest version) for the newest model report of each model and bank
    version of the study."""
    rows = session.exec(
        select(StructuredReport).where(StructuredReport.study_id == study_id).order_by(col(StructuredReport.id))
    ).all()
    by_id = {r.id: r for r in rows}

    def root(r: StructuredReport) -> StructuredReport:
        seen: set[int | None] = set()
        while r.predecessor_id is not None and r.predecessor_id in by_id and r.id not in seen:
            seen.add(r.id)
            r = by_id[r.predecessor_id]
        return r

    heads: dict[tuple[int, str], StructuredReport] = {}
    for r in rows:
        if not r.verified:
            heads[(r.model_version_id, r.bank_version)] = r
    out = []
    for original in heads.values():
        versions = [r for r in rows if root(r).id == original.id]
        out.append((original, versions[-1]))
    return out


Verdicts = dict[tuple[str, int, str], tuple[SrVerdict | None, tuple[SrComment, ...]]]


def _verdicts(
    session: Session, *, study_id: int, model_version_id: int, bank_version: str
) -> tuple[Verdicts, list[str]]:
    """Per (SOP Instance UID, frame, question id): the latest confirm / reject / correct decision and
    every comment, from the append-only review table; and the deciding reviewers in the order of their
    first decision."""
    rows = session.execute(
        sa_select(Review, col(AppUser.name), col(Image.sop_instance_uid), col(Image.frame), col(Finding.question_id))
        .join(Finding, col(Finding.id) == Review.finding_id)
        .join(Image, col(Image.id) == Finding.image_id)
        .join(AppUser, col(AppUser.id) == Review.user_id)
        .where(
            col(Finding.study_id) == study_id,
            col(Finding.model_version_id) == model_version_id,
            col(Finding.bank_version) == bank_version,
        )
        .order_by(col(Review.id))
    ).all()
    latest: dict[tuple[str, int, str], SrVerdict] = {}
    comments: dict[tuple[str, int, str], list[SrComment]] = defaultdict(list)
    observers: list[str] = []
    for review, user, sop, frame, question_id in rows:
        key = (sop, frame, question_id)
        if review.decision in VERDICT_DECISIONS:
            latest[key] = SrVerdict(
                decision=review.decision,
                reviewer=user,
                at=review.created_at,
                corrected_answer=review.to_answer if review.decision == Decision.CORRECT else None,
            )
            if user not in observers:
                observers.append(user)
        if review.comment:
            comments[key].append(SrComment(author=user, text=review.comment, at=review.created_at))
    keys = set(latest) | set(comments)
    return {k: (latest.get(k), tuple(comments.get(k, ()))) for k in keys}, observers


def _header(raw: bytes) -> Dataset:
    return dcmread(BytesIO(raw), stop_before_pixels=True)


def write_verified_report(rt: Runtime, study_id: int, *, organization: str = DEFAULT_ORGANIZATION) -> dict[str, int]:
    """Once every flagged finding of the study has a verdict (confirm / reject / correct), write a new
    version of each of the study's reports that has decided findings: the model's report with the
    verdicts, corrected answers and comments, VerificationFlag VERIFIED with the deciding reviewers
    as Verifying Observers of `organization`, and the latest earlier version as its predecessor. The
    earlier versions are never changed. Stored, recorded and written back like the first report.
    Idempotent: without new decisions nothing is written (nor sent twice). Returns counts:
    `verified_reports` written, `verified_reports_sent`, and `undecided` flags when it waited."""
    counts = {"verified_reports": 0, "verified_reports_sent": 0}
    with session_scope(rt.engine) as session:
        undecided = reviews.undecided_flagged(session=session, study_id=study_id)
        if undecided:
            return {**counts, "undecided": undecided}
        study = session.get(Study, study_id)
        if study is None:
            raise PermanentError(f"no study {study_id}")
        study_uid, source_id = study.study_instance_uid, study.source_id
        plans = []
        for original, latest in _chains(session, study_id):
            verdicts, observers = _verdicts(
                session,
                study_id=study_id,
                model_version_id=original.model_version_id,
                bank_version=original.bank_version,
            )
            if not observers:
                continue  # nothing decided on this report's findings
            mv = session.get(ModelVersion, original.model_version_id)
            assert mv is not None
            plans.append((original, latest, verdicts, observers, model_version_key(mv)))
    for original, latest, verdicts, observers, mv_key in plans:
        read = read_sr_findings(rt.store.get(original.object_key))
        images = with_verdicts(images_of_report(read), verdicts)
        predecessor = _header(rt.store.get(latest.object_key))
        built = build_sr(
            evidence=evidence_of_report(read["doc"]),
            images=images,
            provenance=provenance_of_report(read, model_version_key=mv_key),
            procedures=read["procedures"],
            library=library_of_report(read),
            verification=SrVerification(observers=tuple(observers), organization=organization, predecessor=predecessor),
            instance_number=int(predecessor.get("InstanceNumber") or 1) + 1,
        )
        row, written, sent = _keep(
            rt,
            built=built,
            study_uid=study_uid,
            source_id=source_id,
            values={
                "study_id": study_id,
                "model_version_id": original.model_version_id,
                "bank_version": original.bank_version,
                "images": len(images),
                "findings": sum(len(i.answers) for i in images),
                "verified": True,
                "predecessor_id": latest.id,
            },
        )
        counts["verified_reports"] += written
        counts["verified_reports_sent"] += sent
        if written:
            log.info("study %d: verified SR %d written (predecessor %d)", study_id, row.id, latest.id)
    return counts


def verified_reports_hook(settings: NightreadSettings) -> Callable[[int], None]:
    """The review page's hook: when a study's last flagged finding is decided, its reports get a new,
    verified version (`write_verified_report`), stored and written back like the first. One runtime for the
    page's life, built at the first decision; one study at a time."""
    built: list[Runtime] = []
    lock = threading.Lock()

    def on_study_decided(study_id: int) -> None:
        with lock:
            if not built:
                built.append(Runtime.build(settings))
            write_verified_report(built[0], study_id, organization=settings.review.verifying_organization)

    return on_study_decided
