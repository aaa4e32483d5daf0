"""The small protocols the flows talk to; each outside system has one or more adapters behind them."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from pydicom import Dataset


@dataclass(frozen=True)
class StudyRef:
    """One study as a PACS announced it in a C-FIND (or QIDO-RS) answer."""

    study_instance_uid: str
    study_date: str = ""  # YYYYMMDD
    study_time: str = ""  # HHMMSS(.ffffff)
    accession_number: str = ""
    modalities: tuple[str, ...] = ()
    description: str = ""
    number_of_instances: int | None = None

    @property
    def sort_key(self) -> tuple[str, str]:
        return (self.study_date, _norm_time(self.study_time))


@dataclass(frozen=True)
class SeriesRef:
    series_instance_uid: str
    modality: str = ""
    series_number: int | None = None
    description: str = ""
    body_part: str = ""
    number_of_instances: int | None = None


@dataclass(frozen=True)
class RetrievedStudy:
    """What a retrieval left on disk: one file per instance in `folder`."""

    study_instance_uid: str
    folder: Path
    files: tuple[Path, ...]
    expected: int | None


def _norm_time(value: str) -> str:
    digits = value.split(".")[0].replace(":", "")
    return (digits + "000000")[:6]


@runtime_checkable
class StudySource(Protocol):
    """A PACS we discover studies in and retrieve them from."""

    name: str

    def echo(self) -> None: ...

    def find_studies(self, *, since: dt.datetime | None, modalities: Sequence[str] = ()) -> list[StudyRef]: ...

    def find_studies_on(
        self, *, date: str, time_range: tuple[str, str] | None = None, modalities: Sequence[str] = ()
    ) -> list[StudyRef]: ...

    def find_series(self, study_instance_uid: str) -> list[SeriesRef]: ...

    def retrieve_study(self, study_instance_uid: str, *, dest: Path, expected: int | None = None) -> RetrievedStudy: ...


@runtime_checkable
class WritableSource(Protocol):
    """A source we can send our own DICOM objects (SRs) back to: C-STORE or STOW-RS."""

    def store_instances(self, datasets: Sequence[Dataset]) -> None: ...


@runtime_checkable
class ObjectStore(Protocol):
    """Write-once-by-key blob storage (a folder, MinIO, any S3)."""

    def put(self, key: str, data: bytes, *, content_type: str = "application/octet-stream") -> None: ...

    def get(self, key: str) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str = "") -> Iterator[str]: ...

    def delete(self, key: str) -> None: ...

    def url(self, key: str) -> str: ...

    def link(self, key: str, *, expires_s: int = 3600) -> str: ...


@dataclass(frozen=True)
class Question:
    id: str
    text: str
    kind: str = "closed"  # closed | open
    flag_threshold: float | None = None
    critical: bool = False
    max_new_tokens: int = 24
    prompt: str | None = None  # overrides how the question is put to the model (the bank's choice)


@dataclass(frozen=True)
class ImageContext:
    """What the prompt may say about the image (from DICOM tags; never identifiers)."""

    modality: str = ""
    body_part: str = ""
    view: str = ""
    patient_position: str = ""


@dataclass(frozen=True)
class AnnotationRequest:
    """One image and what to ask of it."""

    image_png: bytes
    context: ImageContext
    questions: tuple[Question, ...] = ()
    caption: bool = True
    caption_max_new_tokens: int = 48


@dataclass(frozen=True)
class Answer:
    question_id: str
    text: str
    p_yes: float | None = None  # closed questions only


@dataclass
class AnnotationResult:
    caption: str | None
    answers: list[Answer]
    prompt_version: str
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelInfo:
    """Provenance of every result."""

    name: str
    revision: str
    backend: str
    options: dict[str, str] = field(default_factory=dict)
    offline_stand_in: bool = False


@runtime_checkable
class Annotator(Protocol):
    """Captions and answers for images: in-process (LocalAnnotator) or remote (TritonAnnotator)."""

    @property
    def model_info(self) -> ModelInfo: ...

    def annotate(self, requests: Sequence[AnnotationRequest]) -> list[AnnotationResult]: ...
