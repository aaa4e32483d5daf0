"""SQLModel tables (the data model of DESIGN.md). Unique keys make every re-run idempotent."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, Column, UniqueConstraint
from sqlmodel import Field, SQLModel


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class StudyStatus:
    RECEIVING = "receiving"  # pushed instances still arriving (C-STORE receiver)
    NEW = "new"
    INCOMPLETE = "incomplete"  # retrieval or processing did not finish; tried again next run
    DONE = "done"
    FAILED = "failed"  # gave up after max attempts (see `failure`)

    PENDING = (NEW, INCOMPLETE)


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
