"""A study's findings as FHIR R4 (integrations/fhir.py): a transaction Bundle built from the database,
kept in the object store and, when `fhir.endpoint` is set, POSTed to the FHIR server.

Idempotent by content: the Bundle's bytes depend only on the study, its findings, captions and their
versions, so a re-run builds the same bytes, finds the object under the same key (`fhir/<study
hash>/<content hash>.json`) and writes nothing; a marker object beside it (`….sent-<endpoint hash>`)
records that this Bundle reached this endpoint, so it is not sent twice either. Changed findings give
a new object beside the old one; on the server, each entry is a conditional PUT on its identifier, so
the report and its Observations are updated in place."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections import defaultdict
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from db import repository as repo
from db.models import Finding, ModelVersion, Study
from db.session import session_scope
from flows.annotate import retry_transient
from flows.rules.questions import Coding, QuestionBank
from flows.wiring.runtime import Runtime
from integrations.errors import NightreadError
from integrations.fhir import (
    BuiltBundle,
    FhirClient,
    FhirCode,
    FhirFinding,
    FhirImage,
    FhirProvenance,
    FhirSubject,
    build_bundle,
)
from integrations.sr import nightread_version

STAGE = "fhir"


def bundle_key(*, study_uid: str, content_sha: str) -> str:
    study = repo.pseudonym(study_uid, namespace="study")[:20]
    return f"fhir/{study}/{content_sha[:20]}.json"


def sent_key(*, bundle: str, endpoint: str) -> str:
    """The marker saying the Bundle at key `bundle` reached `endpoint` (by a hash of its URL)."""
    return f"{bundle.removesuffix('.json')}.sent-{hashlib.sha256(endpoint.encode()).hexdigest()[:12]}"


def _code(c: Coding | None) -> FhirCode | None:
    return None if c is None else FhirCode(scheme=c.scheme, value=c.value, meaning=c.meaning)


def _finding(bank: QuestionBank, f: Finding) -> FhirFinding:
    try:
        spec = bank.by_id(f.question_id)
    except KeyError:  # a finding of this bank version is always in it; stay readable if not
        code, text, finding_type, finding_site = FhirCode("99NIGHTREAD", f.question_id, f.question_id), None, None, None
    else:
        code, text = FhirCode(spec.code.scheme, spec.code.value, spec.code.meaning), spec.text
        finding_type, finding_site = _code(spec.finding_type), _code(spec.finding_site)
    return FhirFinding(
        question_id=f.question_id,
        question_text=text or f.question_id,
        kind=f.kind,
        code=code,
        answer=f.answer,
        p_yes=f.probability,
        flagged=f.flagged,
        flag_reason=f.flag_reason,
        render_version=f.render_version,
        prompt_version=f.prompt_version,
        finding_type=finding_type,
        finding_site=finding_site,
    )


def build_study_bundle(rt: Runtime, study_id: int, model_version_id: int) -> tuple[str, BuiltBundle] | None:
    """The study's Bundle from the database (None when nothing was annotated), with its Study Instance UID."""
    bank = rt.bank
    fhir = rt.settings.fhir
    with session_scope(rt.engine) as session:
        study = session.get(Study, study_id)
        mv = session.get(ModelVersion, model_version_id)
        if study is None or mv is None:
            raise LookupError(f"no study {study_id} or no model version {model_version_id}")
        inputs = repo.report_inputs(
            session=session, study_id=study_id, model_version_id=model_version_id, bank_version=bank.version
        )
        study_uid = study.study_instance_uid
        provenance = FhirProvenance(
            model_name=mv.name,
            model_revision=mv.revision,
            model_backend=mv.backend,
            model_version_key=f"{mv.name}@{mv.revision}/{mv.backend}/{mv.options_hash}",
            bank_version=bank.version,
            prompt_version=str(mv.options.get("prompt_version", "")),
            nightread_version=nightread_version(),
        )
        patient_id = (
            repo.kept_patient_id(session=session, study_id=study_id)
            if fhir.patient_identifier_system and rt.settings.review.show_patient_identifiers
            else None
        )
    # CT slices rendered in several windows are one source image: their answers go together (as in the SR)
    grouped: dict[tuple[str, int], dict[str, Any]] = defaultdict(lambda: {"caption": None, "findings": []})
    stamps: list[dt.datetime] = []
    for image, caption, findings in inputs:
        if caption is None and not findings:
            continue
        entry = grouped[(image.sop_instance_uid, image.frame)]
        entry["modality"] = image.modality
        if caption is not None:
            entry["caption"] = caption.text
            stamps.append(caption.created_at)
        entry["findings"].extend(_finding(bank, f) for f in findings)
        stamps.extend(f.created_at for f in findings)
    if not grouped:
        return None
    images = [
        FhirImage(
            sop_instance_uid=sop,
            frame=frame,
            modality=entry["modality"],
            caption=entry["caption"],
            findings=tuple(entry["findings"]),
        )
        for (sop, frame), entry in grouped.items()
    ]
    subject = (
        FhirSubject(system=fhir.patient_identifier_system, value=patient_id)
        if fhir.patient_identifier_system and patient_id
        else None
    )
    # issued: when the model's last result of this report was recorded (from the rows: the same findings,
    # the same instant, the same bytes)
    built = build_bundle(
        study_uid=study_uid, images=images, provenance=provenance, subject=subject, issued=max(stamps, default=None)
    )
    return study_uid, built


@task(name="export-fhir", cache_policy=NO_CACHE)
def export_fhir(rt: Runtime, study_id: int, model_version_id: int) -> dict[str, int]:
    """Build the study's FHIR Bundle, keep it in the object store, POST it when an endpoint is set."""
    logger = get_run_logger()
    fhir = rt.settings.fhir
    found = build_study_bundle(rt, study_id, model_version_id)
    if found is None:
        return {}
    study_uid, built = found
    key = bundle_key(study_uid=study_uid, content_sha=built.content_sha)
    counts = {"fhir_bundles": 0, "fhir_sent": 0}
    if not rt.store.exists(key):
        rt.store.put(key, built.to_bytes(), content_type="application/fhir+json")
        counts["fhir_bundles"] = 1
        logger.info("study %d: FHIR Bundle stored (%d observations)", study_id, built.observations)
    if fhir.endpoint:
        marker = sent_key(bundle=key, endpoint=fhir.endpoint)
        if not rt.store.exists(marker):
            with FhirClient(
                base_url=fhir.endpoint,
                bearer_token=fhir.bearer_token.get_secret_value(),
                timeout_s=fhir.timeout_s,
                ca_file=fhir.ca_file,
            ) as client:
                result = client.post_bundle(rt.store.get(key))
            answer = {"status_code": result.status_code, "entries": list(result.entry_statuses)}
            rt.store.put(marker, json.dumps(answer).encode(), content_type="application/json")
            counts["fhir_sent"] = 1
            logger.info("study %d: FHIR Bundle sent (HTTP %d)", study_id, result.status_code)
    return counts


def export_study_fhir(rt: Runtime, study_id: int, model_version_id: int, run_id: int | None) -> dict[str, int]:
    """`export_fhir` with the flow's retries (transient errors only). A failure is recorded (stage
    `fhir`) and counted; the study's findings, SR and status are not touched by it."""
    flow = rt.settings.flow
    ref = f"study:{study_id}:mv:{model_version_id}"
    try:
        counts = export_fhir.with_options(
            retries=flow.retries, retry_delay_seconds=flow.retry_delay_s, retry_condition_fn=retry_transient
        )(rt, study_id, model_version_id)
    except NightreadError as exc:
        with session_scope(rt.engine) as session:
            repo.record_failure(
                session=session, stage=STAGE, object_ref=ref, error=exc, study_id=study_id, run_id=run_id
            )
        get_run_logger().warning("study %d: FHIR Bundle not stored or not sent: %s", study_id, exc)
        return {"fhir_failures": 1}
    with session_scope(rt.engine) as session:
        repo.resolve_failures(session=session, stage=STAGE, object_ref=ref)
    return counts
