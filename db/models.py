"""SQLModel tables (the data model of DESIGN.md). Unique keys make every re-run idempotent."""

from __future__ import annotations

import datetime as dt
from enum import StrEnum, nonmember
from typing import Any

from sqlalchemy import JSON, Column, Index, UniqueConstraint, func, literal_column, text
from sqlmodel import Field, SQLModel, col


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class StudyStatus(StrEnum):
    """A study's place in its life (`study.status`, db/ledger.py moves it). Members equal their strings,
    so the column stays `str`."""

    RECEIVING = "receiving"  # pushed instances still arriving (C-STORE receiver)
    NEW = "new"
    RETRIEVING = "retrieving"  # an attempt is under way (counted); a dead process's are recovered
    INCOMPLETE = "incomplete"  # retrieval or processing did not finish; tried again next run
    DONE = "done"
    FAILED = "failed"  # gave up after max attempts (see `failure`)

    PENDING = nonmember((NEW, INCOMPLETE))  # taken by the next run


class PacsSource(SQLModel, table=True):
    __tablename__ = "pacs_source"
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, index=True, max_length=64)
    kind: str = Field(max_length=16)  # sample | dimse | dicomweb
    ae_title: str | None = Field(default=None, max_length=16)
    host: str | None = Field(default=None, max_length=255)
    port: int | None = None
    url: str | None = Field(default=None, max_length=1024)
    # discovery cursor: the latest (StudyDate, StudyTime) whose studies are committed
    cursor_date: str | None = Field(default=None, max_length=8)
    cursor_time: str | None = Field(default=None, max_length=6)
    # the last change of the PACS's own change feed already read (Orthanc's /changes `Last`)
    changes_seq: int | None = None
    # the source's settings (no secrets): how a run reaches it; rows added by `nightread sources add`
    config: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    enabled: bool = True
    updated_at: dt.datetime = Field(default_factory=utcnow)


class Study(SQLModel, table=True):
    __tablename__ = "study"
    id: int | None = Field(default=None, primary_key=True)
    study_instance_uid: str = Field(unique=True, index=True, max_length=64)
    source_id: int | None = Field(default=None, foreign_key="pacs_source.id")
    accession_hash: str | None = Field(default=None, max_length=64)
    study_date: str | None = Field(default=None, max_length=8, index=True)
    study_time: str | None = Field(default=None, max_length=6)
    modalities: str = Field(default="", max_length=64)  # "CT\\PT"
    body_part: str | None = Field(default=None, max_length=64)
    status: str = Field(default=StudyStatus.NEW, max_length=16, index=True)
    expected_instances: int | None = None
    received_instances: int | None = None
    attempts: int = 0
    last_error: str | None = Field(default=None, max_length=1000)
    # who works on the study now ("host:pid"), and until when unless renewed (db/ledger.py `claim`)
    lease_owner: str | None = Field(default=None, max_length=128)
    lease_until: dt.datetime | None = Field(default=None, index=True)
    created_at: dt.datetime = Field(default_factory=utcnow)
    updated_at: dt.datetime = Field(default_factory=utcnow)


class Image(SQLModel, table=True):
    __tablename__ = "image"
    __table_args__ = (UniqueConstraint("sop_instance_uid", "frame", "render_version", name="uq_image_key"),)
    id: int | None = Field(default=None, primary_key=True)
    study_id: int = Field(foreign_key="study.id", index=True)
    sop_instance_uid: str = Field(max_length=64, index=True)
    series_instance_uid: str = Field(max_length=64)
    modality: str = Field(max_length=16)
    body_part: str | None = Field(default=None, max_length=64)
    view: str | None = Field(default=None, max_length=16)
    patient_position: str | None = Field(default=None, max_length=16)
    # CT: the window(s) this rendering used ("" = the file's own; see integrations.imaging.window_key)
    ct_window: str | None = Field(default=None, max_length=64)
    # the selection rule's view role ("frontal", "lateral") and the image it is paired with in its study
    view_role: str | None = Field(default=None, max_length=16)
    paired_sop_instance_uid: str | None = Field(default=None, max_length=64)
    frame: int = 0
    render_version: str = Field(max_length=32)
    object_key: str = Field(max_length=512)
    sha256: str = Field(max_length=64)
    width: int
    height: int
    created_at: dt.datetime = Field(default_factory=utcnow)


class ModelVersion(SQLModel, table=True):
    __tablename__ = "model_version"
    __table_args__ = (UniqueConstraint("name", "revision", "backend", "options_hash", name="uq_model_version"),)
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=255)
    revision: str = Field(max_length=64)
    backend: str = Field(max_length=16)
    options_hash: str = Field(max_length=64)
    options: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    offline_stand_in: bool = False
    temperature: float = 1.0
    # set by `nightread models promote` (only after a validation run meeting the configured minimums)
    promoted_at: dt.datetime | None = None
    created_at: dt.datetime = Field(default_factory=utcnow)


class Caption(SQLModel, table=True):
    __tablename__ = "caption"
    __table_args__ = (UniqueConstraint("image_id", "model_version_id", "prompt_version", name="uq_caption_key"),)
    id: int | None = Field(default=None, primary_key=True)
    image_id: int = Field(foreign_key="image.id", index=True)
    model_version_id: int = Field(foreign_key="model_version.id")
    prompt_version: str = Field(max_length=32)
    render_version: str = Field(max_length=32)
    text: str
    latency_ms: float | None = None
    created_at: dt.datetime = Field(default_factory=utcnow)


class Finding(SQLModel, table=True):
    __tablename__ = "finding"
    __table_args__ = (
        UniqueConstraint("image_id", "model_version_id", "question_id", "bank_version", name="uq_finding_key"),
    )
    id: int | None = Field(default=None, primary_key=True)
    study_id: int = Field(foreign_key="study.id", index=True)
    image_id: int = Field(foreign_key="image.id", index=True)
    model_version_id: int = Field(foreign_key="model_version.id")
    question_id: str = Field(max_length=64, index=True)
    bank_version: str = Field(max_length=32)
    prompt_version: str = Field(max_length=32)
    render_version: str = Field(max_length=32)
    kind: str = Field(max_length=8)  # closed | open
    answer: str
    probability: float | None = None
    flagged: bool = Field(default=False, index=True)
    flag_reason: str | None = Field(default=None, max_length=255)
    created_at: dt.datetime = Field(default_factory=utcnow)


# the review queue's two orders over closed findings (db/reviews.py reads its pages in index order; 0013)
Index(
    "ix_finding_queue_critical",
    col(Finding.flagged),
    col(Finding.probability).desc(),
    col(Finding.id),
    postgresql_where=text("kind = 'closed'"),
    sqlite_where=text("kind = 'closed'"),
)
Index(
    "ix_finding_queue_uncertain",
    col(Finding.flagged),
    func.abs(func.coalesce(col(Finding.probability), literal_column("0.0")) - literal_column("0.5")),
    col(Finding.id),
    postgresql_where=text("kind = 'closed'"),
    sqlite_where=text("kind = 'closed'"),
)


class Run(SQLModel, table=True):
    __tablename__ = "run"
    id: int | None = Field(default=None, primary_key=True)
    flow_run_id: str | None = Field(default=None, max_length=64, index=True)
    kind: str = Field(max_length=32)
    parameters: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    counts: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    status: str = Field(default="running", max_length=32)
    started_at: dt.datetime = Field(default_factory=utcnow)
    finished_at: dt.datetime | None = None


class Failure(SQLModel, table=True):
    __tablename__ = "failure"
    __table_args__ = (UniqueConstraint("stage", "object_ref", name="uq_failure_key"),)
    id: int | None = Field(default=None, primary_key=True)
    run_id: int | None = Field(default=None, foreign_key="run.id")
    study_id: int | None = Field(default=None, foreign_key="study.id", index=True)
    stage: str = Field(max_length=32)  # discover | retrieve | render | annotate | record
    object_ref: str = Field(max_length=128)  # a hash or a database id, never a raw UID
    error_class: str = Field(max_length=128)
    message: str = Field(max_length=1000)
    attempts: int = 1
    resolved: bool = False
    created_at: dt.datetime = Field(default_factory=utcnow)
    updated_at: dt.datetime = Field(default_factory=utcnow)


class StructuredReport(SQLModel, table=True):
    """A DICOM SR built for a study and model version (integrations/sr.py); the file is in the object
    store. Its SOP Instance UID is derived from its content: the same findings (and verdicts) give the
    same UID. A report is never changed: the reviewers' verdicts make a new, verified version."""

    __tablename__ = "structured_report"
    id: int | None = Field(default=None, primary_key=True)
    study_id: int = Field(foreign_key="study.id", index=True)
    model_version_id: int = Field(foreign_key="model_version.id")
    bank_version: str = Field(max_length=32)
    sop_instance_uid: str = Field(max_length=64, unique=True)
    series_instance_uid: str = Field(max_length=64)
    content_sha: str = Field(max_length=64)
    object_key: str = Field(max_length=512)
    images: int = 0
    findings: int = 0
    # a later version carrying the reviewers' verdicts (VerificationFlag VERIFIED) and the version it
    # replaces (its Predecessor Documents Sequence); the model's own report has neither
    verified: bool = Field(default=False, sa_column_kwargs={"server_default": "0"})
    predecessor_id: int | None = Field(default=None, foreign_key="structured_report.id")
    sent_at: dt.datetime | None = None  # written back to the PACS (C-STORE or STOW-RS)
    created_at: dt.datetime = Field(default_factory=utcnow)


class Role(StrEnum):
    """What a user of the review page may do (`app_user.role`)."""

    VIEWER = "viewer"  # reads the queue and studies
    REVIEWER = "reviewer"  # + decides on findings
    ADMIN = "admin"  # + everything a reviewer does (user management is the CLI's)

    ALL = nonmember((VIEWER, REVIEWER, ADMIN))
    DECIDE = nonmember((REVIEWER, ADMIN))


class AppUser(SQLModel, table=True):
    """A person who signs in to the review page (password hashed with argon2id)."""

    __tablename__ = "app_user"
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=64, unique=True, index=True)
    role: str = Field(max_length=16)
    password_hash: str = Field(max_length=255)
    disabled: bool = False
    # signed into every API token: a password change, reset or disable bumps it, and older tokens stop working
    auth_version: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    created_at: dt.datetime = Field(default_factory=utcnow)


class UserSession(SQLModel, table=True):
    """A signed-in browser session of the review page. The cookie carries a random key; only its
    SHA-256 is stored. Logout, a password change or reset and disabling the user end it here, so a
    copied cookie stops working at once."""

    __tablename__ = "user_session"
    id: int | None = Field(default=None, primary_key=True)
    key_hash: str = Field(max_length=64, unique=True, index=True)
    user_id: int = Field(foreign_key="app_user.id", index=True)
    client: str | None = Field(default=None, max_length=64)  # the address it logged in from
    created_at: dt.datetime = Field(default_factory=utcnow)
    expires_at: dt.datetime
    ended_at: dt.datetime | None = None
    end_reason: str | None = Field(default=None, max_length=32)  # logout | password | disabled | ...


class LoginThrottle(SQLModel, table=True):
    """Failed logins of one user name (`user:NAME`, or `user#HMAC` for a name no user has) or one client
    address (`addr:ADDRESS`) in the current window, and the lock they earned (db.reviews.LoginPolicy)."""

    __tablename__ = "login_throttle"
    key: str = Field(max_length=80, primary_key=True)
    failures: int = 0
    window_start: dt.datetime = Field(default_factory=utcnow)
    locked_until: dt.datetime | None = None
    lockouts: int = 0  # locks in a row without a successful login: each one lasts twice as long
    refused: int = 0  # attempts refused during the current lock
    updated_at: dt.datetime = Field(default_factory=utcnow)


class AuditAction(StrEnum):
    """What the audit log records (`audit_event.action`)."""

    LOGIN_OK = "login_ok"
    LOGIN_FAILED = "login_failed"  # wrong password, unknown or disabled user
    LOGIN_LOCKED = "login_locked"  # a user name or address is locked after too many failures
    LOGIN_REFUSED = "login_refused"  # an attempt refused while locked (the first of each lock)
    LOGOUT = "logout"
    PASSWORD_CHANGED = "password_changed"  # by the user, on the review page
    USER_ADDED = "user_added"
    USER_DISABLED = "user_disabled"
    USER_ENABLED = "user_enabled"
    USER_ROLE_SET = "user_role_set"
    USER_PASSWORD_RESET = "user_password_reset"  # by an administrator
    USER_UNLOCKED = "user_unlocked"
    AUDIT_EXPORTED = "audit_exported"
    COHORT_EXPORTED = "cohort_exported"
    REIDENTIFIED = "reidentified"
    MODEL_PROMOTED = "model_promoted"


class AuditEvent(SQLModel, table=True):
    """One security-relevant event: who (a user name, `cli:OSUSER`, or `unknown#HMAC` for a login name no
    user has), what, on what, from where. Never a password, never patient data. Append-only (triggers
    refuse UPDATE and DELETE, like `review`)."""

    __tablename__ = "audit_event"
    id: int | None = Field(default=None, primary_key=True)
    at: dt.datetime = Field(default_factory=utcnow, index=True)
    action: str = Field(max_length=32, index=True)
    actor: str = Field(max_length=80)
    subject: str | None = Field(default=None, max_length=80)  # the user, model version... acted on
    client: str | None = Field(default=None, max_length=64)  # the client address, or "cli"
    detail: str | None = Field(default=None, max_length=1000)


class Decision(StrEnum):
    """A reviewer's decision on a finding (`review.decision`)."""

    CONFIRM = "confirm"  # the model's answer is right
    REJECT = "reject"  # the model's answer is wrong
    CORRECT = "correct"  # the right answer is `to_answer`
    COMMENT = "comment"  # a comment only; the finding's review state does not change

    ALL = nonmember((CONFIRM, REJECT, CORRECT, COMMENT))


class Review(SQLModel, table=True):
    """One decision on one finding. Append-only (triggers refuse UPDATE and DELETE): the latest row
    of a finding is its review state, the earlier ones its history."""

    __tablename__ = "review"
    id: int | None = Field(default=None, primary_key=True)
    finding_id: int = Field(foreign_key="finding.id", index=True)
    user_id: int = Field(foreign_key="app_user.id")
    decision: str = Field(max_length=16, index=True)  # the queue's counts by review state (0013)
    from_answer: str | None = Field(default=None, max_length=255)
    to_answer: str | None = Field(default=None, max_length=255)
    comment: str | None = Field(default=None, max_length=2000)
    created_at: dt.datetime = Field(default_factory=utcnow, index=True)


class StudyIdentity(SQLModel, table=True):
    """Patient identifiers of a study, kept only when `review.show_patient_identifiers` is on (the
    review page shows them to signed-in users then); nothing else reads this table."""

    __tablename__ = "study_identity"
    study_id: int = Field(foreign_key="study.id", primary_key=True)
    patient_name: str | None = Field(default=None, max_length=255)
    patient_id: str | None = Field(default=None, max_length=64)
    accession_number: str | None = Field(default=None, max_length=64)


class ValidationRun(SQLModel, table=True):
    """Metrics of one model version on one labeled set (`nightread validate`)."""

    __tablename__ = "validation_run"
    id: int | None = Field(default=None, primary_key=True)
    model_version_id: int = Field(foreign_key="model_version.id", index=True)
    dataset: str = Field(max_length=512)  # the folder's name, or "reviews"
    dataset_sha: str = Field(max_length=64)  # what exactly was evaluated
    examples: int = 0
    metrics: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    temperature: float | None = None  # fitted on this set (stored on the model version when applied)
    created_at: dt.datetime = Field(default_factory=utcnow)


class Backfill(SQLModel, table=True):
    """Progress of one retrospective backfill: the next day to query; a stopped backfill resumes there."""

    __tablename__ = "backfill"
    id: int | None = Field(default=None, primary_key=True)
    key: str = Field(max_length=255, unique=True)  # source, date range, modalities
    source_id: int = Field(foreign_key="pacs_source.id")
    start_date: str = Field(max_length=8)
    end_date: str = Field(max_length=8)
    modalities: str = Field(default="", max_length=64)
    next_date: str = Field(max_length=8)
    status: str = Field(default="running", max_length=32)  # running | paused | done
    days_done: int = 0
    queries: int = 0
    studies_found: int = 0
    studies_new: int = 0
    last_error: str | None = Field(default=None, max_length=1000)
    created_at: dt.datetime = Field(default_factory=utcnow)
    updated_at: dt.datetime = Field(default_factory=utcnow)


class ReidMap(SQLModel, table=True):
    """Pseudonym -> original identifier of de-identified exports, the original encrypted with the
    de-identification key (integrations/deid.py). Nothing else reads this table; grant it to admins only."""

    __tablename__ = "reid_map"
    __table_args__ = (UniqueConstraint("kind", "pseudonym", name="uq_reid_key"),)
    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(max_length=32)  # uid | patient | accessionnumber | studyid
    pseudonym: str = Field(max_length=64, index=True)
    original_encrypted: str = Field(max_length=1024)
    created_at: dt.datetime = Field(default_factory=utcnow)
