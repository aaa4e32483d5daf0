"""A study's findings as a DICOM SR: built with highdicom, kept in the object store, recorded in the
database and, when the source's `write_back` is on, sent back to the PACS.

The SR's SOP Instance UID comes from its content (integrations/sr.py): re-running a study whose
findings did not change yields the same UID, finds the row, and sends nothing twice; a new model or
question bank version gives a new SR beside the old one."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from io import BytesIO
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydicom import dcmread
from sqlmodel import select

from db import repository as repo
from db.models import ModelVersion, StructuredReport, Study, utcnow
from db.session import session_scope
from flows.wiring.runtime import Runtime
from integrations.errors import ConfigurationError
from integrations.ports import WritableSource
from integrations.sr import SrAnswer, SrImage, SrProvenance, build_sr, nightread_version


def report_key(*, study_uid: str, sop_uid: str) -> str:
    study = repo.pseudonym(study_uid, namespace="study")[:20]
    return f"reports/{study}/{repo.pseudonym(sop_uid, namespace='sop')[:20]}.dcm"


def _headers(sources: Mapping[str, Path], wanted: set[str]) -> dict[str, Any]:
    """The headers (no pixels) of the wanted instances, read from the files they came in."""
    out: dict[str, Any] = {}
    for uid in sorted(wanted & set(sources)):
        try:
            out[uid] = dcmread(sources[uid], stop_before_pixels=True, force=True)
        except Exception:  # unreadable files already have their failure row from rendering
            continue
    return out


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
            model_version_key=f"{mv.name}@{mv.revision}/{mv.backend}/{mv.options_hash}",
            bank_version=bank.version,
            prompt_version=str(mv.options.get("prompt_version", "")),
            nightread_version=nightread_version(),
        )
    # CT slices rendered in several windows are one source image: their answers go together
    grouped: dict[tuple[str, int], dict[str, Any]] = defaultdict(lambda: {"caption": None, "answers": []})
    texts = {q.id: q.text for q in bank.questions}
    for image, caption, findings in inputs:
        if caption is None and not findings:
            continue
        entry = grouped[(image.sop_instance_uid, image.frame)]
        entry["render_version"] = entry.get("render_version") or image.render_version
        if caption is not None:
            entry["caption"], entry["render_version"] = caption.text, image.render_version
        for f in findings:
            entry["answers"].append(
                SrAnswer(
                    question_id=f.question_id,
                    question_text=texts.get(f.question_id, f.question_id),
                    kind=f.kind,
                    answer=f.answer,
                    p_yes=f.probability,
                    flagged=f.flagged,
                )
            )
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
        )
        for (sop, frame), entry in grouped.items()
        if sop in headers
    ]
    built = build_sr(evidence=list(headers.values()), images=images, provenance=provenance)
    key = report_key(study_uid=study_uid, sop_uid=built.sop_instance_uid)
    counts = {"reports": 0, "reports_sent": 0}
    with session_scope(rt.engine) as session:
        known = session.exec(
            select(StructuredReport).where(StructuredReport.sop_instance_uid == built.sop_instance_uid)
        ).first()
    if known is None:
        rt.store.put(key, built.to_bytes(), content_type="application/dicom")
        with session_scope(rt.engine) as session:
            known = repo.record_report(
                session=session,
                values={
                    "study_id": study_id,
                    "model_version_id": model_version_id,
                    "bank_version": bank.version,
                    "sop_instance_uid": built.sop_instance_uid,
                    "series_instance_uid": built.series_instance_uid,
                    "content_sha": built.content_sha,
                    "object_key": key,
                    "images": len(images),
                    "findings": sum(len(i.answers) for i in images),
                    "created_at": utcnow(),
                },
            )
        counts["reports"] = 1
    if source_id is not None and known.sent_at is None and rt.source_settings(source_id).write_back:
        source = rt.source(source_id)
        if not isinstance(source, WritableSource):
            raise ConfigurationError(f"source {rt.source_settings(source_id).name!r} cannot take objects back")
        source.store_instances([dcmread(BytesIO(rt.store.get(known.object_key)))])
        with session_scope(rt.engine) as session:
            row = session.get(StructuredReport, known.id)
            assert row is not None
            row.sent_at = utcnow()
            session.add(row)
        counts["reports_sent"] = 1
        logger.info("study %d: SR %d sent to the PACS", study_id, known.id)
    return counts
