"""Query and upsert functions. Keyword-only arguments, an explicit `session`, no commits here:
the caller's `session_scope` owns the transaction. Upserts use the dialect's
INSERT … ON CONFLICT so a re-run writes nothing twice on SQLite and Postgres alike."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import func
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, SQLModel, col, select

from db.models import (
    Caption,
    Failure,
    Finding,
    Image,
    ModelVersion,
    PacsSource,
    ReidMap,
    Run,
    StructuredReport,
    Study,
    StudyIdentity,
    StudyStatus,
    ValidationRun,
    utcnow,
)


def _insert(session: Session, model: type[SQLModel]) -> Any:
    dialect = session.get_bind().dialect.name
    table = model.__table__  # type: ignore[attr-defined]
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"database dialect {dialect!r} is not supported (use SQLite or Postgres)")


def _insert_ignore(
    session: Session, model: type[SQLModel], rows: Sequence[Mapping[str, Any]], keys: Sequence[str]
) -> int:
    """INSERT rows, skipping those whose unique `keys` exist; returns how many were inserted."""
    if not rows:
        return 0
    table = model.__table__  # type: ignore[attr-defined]
    stmt = (
        _insert(session, model)
        .values(list(rows))
        .on_conflict_do_nothing(index_elements=list(keys))
        .returning(table.c.id)  # rowcount is not reliable for multi-row inserts on every driver
    )
    return len(session.exec(stmt).all())


def pseudonym(value: str, *, namespace: str) -> str:
    """A stable non-reversible handle for an identifier (for keys, logs and the accession column)."""
    return hashlib.sha256(f"nightread:{namespace}:{value}".encode()).hexdigest()[:32]


# --- sources and discovery cursor ------------------------------------------------------------


def upsert_source(
    *,
    session: Session,
    name: str,
    kind: str,
    ae_title: str | None = None,
    host: str | None = None,
    port: int | None = None,
    url: str | None = None,
    config: Mapping[str, Any] | None = None,
    enabled: bool | None = None,
) -> PacsSource:
    """Insert or update a source by name. Its discovery cursor is kept, and so is whether it is
    enabled unless `enabled` is given (a new source is enabled)."""
    values: dict[str, Any] = {
        "name": name,
        "kind": kind,
        "ae_title": ae_title,
        "host": host,
        "port": port,
        "url": url,
        "config": dict(config) if config is not None else None,
    }
    update = {k: v for k, v in values.items() if k != "name"} | {"updated_at": utcnow()}
    if enabled is not None:
        update["enabled"] = enabled
    stmt = _insert(session, PacsSource).values(
        **values, enabled=True if enabled is None else enabled, updated_at=utcnow()
    )
    stmt = stmt.on_conflict_do_update(index_elements=["name"], set_=update)
    session.exec(stmt)
    return session.exec(
        select(PacsSource).where(PacsSource.name == name).execution_options(populate_existing=True)
    ).one()


def list_sources(*, session: Session, enabled_only: bool = False) -> list[PacsSource]:
    stmt = select(PacsSource)
    if enabled_only:
        stmt = stmt.where(col(PacsSource.enabled).is_(True))
    return list(session.exec(stmt.order_by(col(PacsSource.name))))


def move_cursor(*, session: Session, source_id: int, date: str, time: str) -> None:
    """Advance the discovery cursor; it never moves backwards."""
    source = session.get(PacsSource, source_id)
    if source is None:
        raise LookupError(f"no pacs_source with id {source_id}")
    if (source.cursor_date or "", source.cursor_time or "") < (date, time):
        source.cursor_date, source.cursor_time = date, time
        source.updated_at = utcnow()
        session.add(source)


def move_changes_seq(*, session: Session, source_id: int, seq: int) -> None:
    """Where discovery stands in the PACS's change feed; it never moves backwards."""
    source = session.get(PacsSource, source_id)
    if source is None:
        raise LookupError(f"no pacs_source with id {source_id}")
    if source.changes_seq is None or source.changes_seq < seq:
        source.changes_seq, source.updated_at = seq, utcnow()
        session.add(source)


# --- studies -----------------------------------------------------------------------------------


def register_studies(*, session: Session, source_id: int, studies: Iterable[Mapping[str, Any]]) -> int:
    """Insert studies not seen before (by StudyInstanceUID); returns how many were new."""
    rows = [
        {
            "study_instance_uid": s["study_instance_uid"],
            "source_id": source_id,
            "accession_hash": (
                pseudonym(s["accession_number"], namespace="accession") if s.get("accession_number") else None
            ),
            "study_date": s.get("study_date") or None,
            "study_time": s.get("study_time") or None,
            "modalities": "\\".join(s.get("modalities") or ()),
            "expected_instances": s.get("number_of_instances"),
            "status": StudyStatus.NEW,
            "created_at": utcnow(),
            "updated_at": utcnow(),
        }
        for s in studies
    ]
    return _insert_ignore(session, Study, rows, ["study_instance_uid"])


def record_arrival(
    *,
    session: Session,
    source_id: int,
    study_instance_uid: str,
    received: int,
    study_date: str = "",
    study_time: str = "",
    modality: str = "",
    accession_number: str = "",
) -> bool:
    """A pushed instance was filed: register its study (status receiving) or count it. Returns False
    when the study belongs to another source (a PACS we query retrieves it instead)."""
    _insert_ignore(
        session,
        Study,
        [
            {
                "study_instance_uid": study_instance_uid,
                "source_id": source_id,
                "accession_hash": pseudonym(accession_number, namespace="accession") if accession_number else None,
                "study_date": study_date or None,
                "study_time": (study_time.split(".")[0] + "000000")[:6] if study_time else None,
                "modalities": modality,
                "status": StudyStatus.RECEIVING,
                "received_instances": received,
                "created_at": utcnow(),
                "updated_at": utcnow(),
            }
        ],
        ["study_instance_uid"],
    )
    study = session.exec(
        select(Study).where(Study.study_instance_uid == study_instance_uid).execution_options(populate_existing=True)
    ).one()
    if study.source_id != source_id:
        return False
    modalities = set(filter(None, study.modalities.split("\\"))) | ({modality} if modality else set())
    study.modalities = "\\".join(sorted(modalities))
    study.received_instances = max(received, study.received_instances or 0)
    if study.status != StudyStatus.RECEIVING:  # more instances for a study already read: read it again
        study.status, study.attempts = StudyStatus.RECEIVING, 0
    study.updated_at = utcnow()
    session.add(study)
    return True


def release_received_studies(*, session: Session, source_id: int, quiet_before: dt.datetime) -> int:
    """Pushed studies that are complete become `new`: by count when the expected number is known,
    else when no instance arrived since `quiet_before`."""
    released = 0
    receiving = select(Study).where(Study.source_id == source_id, Study.status == StudyStatus.RECEIVING)
    for study in session.exec(receiving):
        expected = study.expected_instances
        by_count = expected is not None and (study.received_instances or 0) >= expected
        updated = study.updated_at if study.updated_at.tzinfo else study.updated_at.replace(tzinfo=dt.UTC)
        if by_count or updated <= quiet_before:
            study.status = StudyStatus.NEW
            session.add(study)
            released += 1
    return released


def pending_studies(*, session: Session, max_attempts: int, source_id: int | None = None) -> list[Study]:
    stmt = select(Study).where(col(Study.status).in_(StudyStatus.PENDING), Study.attempts < max_attempts)
    if source_id is not None:
        stmt = stmt.where(Study.source_id == source_id)
    return list(session.exec(stmt.order_by(col(Study.study_date), col(Study.study_time), col(Study.id))))


def update_study(*, session: Session, study_id: int, **changes: Any) -> Study:
    study = session.get(Study, study_id)
    if study is None:
        raise LookupError(f"no study with id {study_id}")
    for key, value in changes.items():
        if not hasattr(study, key):
            raise AttributeError(f"study has no column {key!r}")
        setattr(study, key, value)
    study.updated_at = utcnow()
    session.add(study)
    return study


# --- images, model versions, results ------------------------------------------------------------


def upsert_image(*, session: Session, values: Mapping[str, Any]) -> int:
    """Insert the image unless its (sop, frame, render_version) exists; returns its id."""
    _insert_ignore(session, Image, [dict(values)], ["sop_instance_uid", "frame", "render_version"])
    image = session.exec(
        select(Image).where(
            Image.sop_instance_uid == values["sop_instance_uid"],
            Image.frame == values["frame"],
            Image.render_version == values["render_version"],
        )
    ).one()
    assert image.id is not None
    return image.id


def image_ids(*, session: Session, study_id: int) -> list[int]:
    """The ids of a study's rendered images."""
    return [i for i in session.exec(select(Image.id).where(Image.study_id == study_id)).all() if i is not None]


def options_hash(options: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(dict(options), sort_keys=True).encode()).hexdigest()[:16]


def upsert_model_version(
    *,
    session: Session,
    name: str,
    revision: str,
    backend: str,
    options: Mapping[str, Any],
    offline_stand_in: bool = False,
) -> ModelVersion:
    ohash = options_hash(options)
    _insert_ignore(
        session,
        ModelVersion,
        [
            {
                "name": name,
                "revision": revision,
                "backend": backend,
                "options_hash": ohash,
                "options": dict(options),
                "offline_stand_in": offline_stand_in,
                "temperature": 1.0,
                "created_at": utcnow(),
            }
        ],
        ["name", "revision", "backend", "options_hash"],
    )
    return session.exec(
        select(ModelVersion).where(
            ModelVersion.name == name,
            ModelVersion.revision == revision,
            ModelVersion.backend == backend,
            ModelVersion.options_hash == ohash,
        )
    ).one()


def insert_captions(*, session: Session, rows: Sequence[Mapping[str, Any]]) -> int:
    return _insert_ignore(session, Caption, rows, ["image_id", "model_version_id", "prompt_version"])


def insert_findings(*, session: Session, rows: Sequence[Mapping[str, Any]]) -> int:
    return _insert_ignore(session, Finding, rows, ["image_id", "model_version_id", "question_id", "bank_version"])


def annotation_state(
    *, session: Session, image_ids: Sequence[int], model_version_id: int, bank_version: str
) -> tuple[set[int], set[int]]:
    """(images with findings of this model and bank version, images captioned by this model)."""
    if not image_ids:
        return set(), set()
    answered = session.exec(
        select(Finding.image_id).where(
            col(Finding.image_id).in_(image_ids),
            Finding.model_version_id == model_version_id,
            Finding.bank_version == bank_version,
        )
    ).all()
    captioned = session.exec(
        select(Caption.image_id).where(
            col(Caption.image_id).in_(image_ids), Caption.model_version_id == model_version_id
        )
    ).all()
    return set(answered), set(captioned)


# --- failures and runs ------------------------------------------------------------------------


def record_failure(
    *,
    session: Session,
    stage: str,
    object_ref: str,
    error: BaseException | str,
    study_id: int | None = None,
    run_id: int | None = None,
) -> None:
    """Record (or count again) a failure; the message must already be free of PHI."""
    error_class = type(error).__name__ if isinstance(error, BaseException) else "Error"
    message = (str(error) if isinstance(error, BaseException) else error)[:1000] or error_class
    stmt = _insert(session, Failure).values(
        stage=stage,
        object_ref=object_ref,
        error_class=error_class,
        message=message,
        study_id=study_id,
        run_id=run_id,
        attempts=1,
        resolved=False,
        created_at=utcnow(),
        updated_at=utcnow(),
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=["stage", "object_ref"],
        set_={
            "attempts": Failure.attempts + 1,
            "error_class": error_class,
            "message": message,
            "run_id": run_id,
            "resolved": False,
            "updated_at": utcnow(),
        },
    )
    session.exec(stmt)


def resolve_failures(*, session: Session, stage: str, object_ref: str) -> None:
    for failure in session.exec(select(Failure).where(Failure.stage == stage, Failure.object_ref == object_ref)):
        failure.resolved = True
        session.add(failure)


def start_run(*, session: Session, kind: str, parameters: Mapping[str, Any], flow_run_id: str | None) -> int:
    run = Run(kind=kind, parameters=dict(parameters), flow_run_id=flow_run_id)
    session.add(run)
    session.flush()
    assert run.id is not None
    return run.id


def finish_run(*, session: Session, run_id: int, status: str, counts: Mapping[str, Any]) -> None:
    run = session.get(Run, run_id)
    if run is None:
        raise LookupError(f"no run with id {run_id}")
    run.status, run.counts, run.finished_at = status, dict(counts), utcnow()
    session.add(run)


# --- status -----------------------------------------------------------------------------------


def status_counts(*, session: Session) -> dict[str, Any]:
    by_status = dict(session.exec(select(Study.status, func.count()).group_by(Study.status)).all())
    last = session.exec(select(Run).order_by(col(Run.id).desc()).limit(1)).first()

    def count(model: type[SQLModel], *where: Any) -> int:
        return int(session.exec(select(func.count()).select_from(model).where(*where)).one())

    return {
        "studies": {"total": sum(by_status.values()), **{k: int(v) for k, v in sorted(by_status.items())}},
        "images": count(Image),
        "captions": count(Caption),
        "findings": count(Finding),
        "flags": count(Finding, col(Finding.flagged).is_(True)),
        "failures": count(Failure, col(Failure.resolved).is_(False)),
        "model_versions": count(ModelVersion),
        "reports": count(StructuredReport),
        "reports_sent": count(StructuredReport, col(StructuredReport.sent_at).is_not(None)),
        "last_run": None
        if last is None
        else {
            "id": last.id,
            "kind": last.kind,
            "status": last.status,
            "started_at": last.started_at.isoformat(timespec="seconds"),
            "finished_at": last.finished_at.isoformat(timespec="seconds") if last.finished_at else None,
            "counts": last.counts,
        },
    }


def report_inputs(
    *, session: Session, study_id: int, model_version_id: int, bank_version: str
) -> list[tuple[Image, Caption | None, list[Finding]]]:
    """Each image of a study with its caption and findings by one model version and bank version."""
    images = session.exec(select(Image).where(Image.study_id == study_id).order_by(col(Image.id))).all()
    ids = [i.id for i in images]
    captions = {
        c.image_id: c
        for c in session.exec(
            select(Caption).where(col(Caption.image_id).in_(ids), Caption.model_version_id == model_version_id)
        ).all()
    }
    findings: dict[int, list[Finding]] = {}
    for f in session.exec(
        select(Finding)
        .where(
            Finding.study_id == study_id,
            Finding.model_version_id == model_version_id,
            Finding.bank_version == bank_version,
        )
        .order_by(col(Finding.id))
    ).all():
        findings.setdefault(f.image_id, []).append(f)
    return [(i, captions.get(i.id or 0), findings.get(i.id or 0, [])) for i in images]


def record_report(*, session: Session, values: Mapping[str, Any]) -> StructuredReport:
    """Insert an SR row unless its (content-derived) SOP Instance UID is known; return the row."""
    _insert_ignore(session, StructuredReport, [dict(values)], ["sop_instance_uid"])
    return session.exec(
        select(StructuredReport).where(StructuredReport.sop_instance_uid == values["sop_instance_uid"])
    ).one()


def save_study_identity(*, session: Session, study_id: int, values: Mapping[str, Any]) -> None:
    stmt = _insert(session, StudyIdentity).values({"study_id": study_id, **values})
    session.exec(stmt.on_conflict_do_update(index_elements=["study_id"], set_=dict(values)))


def record_reid(*, session: Session, rows: Sequence[Mapping[str, Any]]) -> int:
    """Store pseudonym -> encrypted original rows of a de-identified export (known ones are kept)."""
    return _insert_ignore(session, ReidMap, rows, ["kind", "pseudonym"])


# --- the command line's queries ---------------------------------------------------------------


def studies_by_status(*, session: Session, touched_since: dt.datetime) -> dict[str, int]:
    """A run's progress: the studies updated since `touched_since` or still pending, counted by status."""
    rows = session.exec(
        select(Study.status, func.count())
        .where((col(Study.updated_at) >= touched_since) | col(Study.status).in_(StudyStatus.PENDING))
        .group_by(Study.status)
    ).all()
    return {status: int(n) for status, n in rows}


def get_study(*, session: Session, study_id: int | None = None, study_instance_uid: str | None = None) -> Study | None:
    """One study by its database id or its Study Instance UID (exactly one of them)."""
    if (study_id is None) == (study_instance_uid is None):
        raise TypeError('Give exactly one of "study_id" and "study_instance_uid".')
    if study_id is not None:
        return session.get(Study, study_id)
    return session.exec(select(Study).where(Study.study_instance_uid == study_instance_uid)).first()


def set_source_enabled(*, session: Session, name: str, enabled: bool) -> PacsSource | None:
    """Enable or disable a source by name; None when there is no such source."""
    source = session.exec(select(PacsSource).where(PacsSource.name == name)).first()
    if source is not None:
        source.enabled = enabled
        session.add(source)
    return source


def model_versions_with_validation(*, session: Session) -> list[tuple[ModelVersion, ValidationRun | None]]:
    """Every model version (by id) with its latest validation run, if any."""
    found: list[tuple[ModelVersion, ValidationRun | None]] = []
    for mv in session.exec(select(ModelVersion).order_by(col(ModelVersion.id))).all():
        latest = session.exec(
            select(ValidationRun).where(ValidationRun.model_version_id == mv.id).order_by(col(ValidationRun.id).desc())
        ).first()
        found.append((mv, latest))
    return found


# --- FHIR output ----------------------------------------------------------------------------------


def kept_patient_id(*, session: Session, study_id: int) -> str | None:
    """The study's Patient ID, when patient identifiers are kept (`review.show_patient_identifiers`
    filled `study_identity`); None otherwise. For the FHIR report's subject only, when configured."""
    identity = session.get(StudyIdentity, study_id)
    return identity.patient_id if identity is not None and identity.patient_id else None
