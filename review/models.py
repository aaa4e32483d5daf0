"""The JSON API's public models: what each `/api` route takes and returns, so `/openapi.json` documents
the exact JSON (the browser page and scripts rely on these field names). Built from the database rows
by the routes (`review/routes/api.py`); nothing here reads the database."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from db.models import StudyStatus

ReviewStateName = Literal["pending", "confirmed", "rejected", "corrected"]


class _Public(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Problem(_Public):
    """An error: why the request was refused or failed."""

    detail: str


# --- /api/token -------------------------------------------------------------------------------------


class Token(_Public):
    access_token: str = Field(description="send as `Authorization: Bearer <access_token>`")
    token_type: Literal["bearer"] = "bearer"
    expires_in: int = Field(description="seconds the token stays valid (a password change or reset ends it sooner)")


# --- /api/queue ---------------------------------------------------------------------------------------


class QueueItemPublic(_Public):
    """One closed finding in the flag queue."""

    finding_id: int
    study_id: int
    image_id: int
    question_id: str
    answer: str = Field(description="the model's answer: yes or no")
    probability: float | None = Field(description="P(yes)")
    flagged: bool
    critical: bool = Field(description="a critical question of the question bank")
    modality: str
    study_date: str | None = Field(description="YYYYMMDD")
    model_version_id: int
    model_name: str
    state: ReviewStateName = Field(description="the review state: the latest confirm / reject / correct")


class QueueCounts(_Public):
    """Counts over the whole queue, whatever the filters: flagged findings, closed findings by review state.
    Each is counted up to 1,000 only (`counted_to`): 1,001 means more than 1,000."""

    counted_to: int = Field(description="each count is counted this far: one above it means more")
    flagged: int
    pending: int
    confirmed: int
    rejected: int
    corrected: int


class QueuePage(_Public):
    items: list[QueueItemPublic]
    total: int = Field(
        description="findings matching the filters, counted up to this page and 1,000 past it (see `more`)"
    )
    more: bool = Field(description="more findings match than `total` (they were not counted)")
    page: int
    pages: int = Field(description="the pages `total` fills; more follow when `more`")
    counts: QueueCounts


# --- /api/studies/{study_id} ------------------------------------------------------------------------------


class CaptionPublic(_Public):
    model_version_id: int
    text: str


class FindingPublic(_Public):
    id: int
    question_id: str
    question: str = Field(description="the question's text (its id when the bank has no text for it)")
    kind: str = Field(description="closed | open")
    answer: str
    probability: float | None = Field(description="P(yes) of a closed question")
    flagged: bool
    model_version_id: int
    bank_version: str
    review_state: ReviewStateName
    corrected_answer: str | None = Field(description="the answer a reviewer's correction holds right")


class ImagePublic(_Public):
    id: int
    url: str = Field(description="the rendered PNG (needs the same authentication)")
    modality: str
    view: str | None
    ct_window: str | None
    render_version: str
    captions: list[CaptionPublic]
    findings: list[FindingPublic]


class PatientPublic(_Public):
    name: str | None
    id: str | None
    accession_number: str | None


class StudyPublic(_Public):
    """A study's images with their captions and findings (images with neither are left out)."""

    id: int
    study_date: str | None = Field(description="YYYYMMDD")
    modalities: str = Field(description="backslash-separated, e.g. CT\\PT")
    status: StudyStatus
    images: list[ImagePublic]
    patient: PatientPublic | None = Field(
        default=None,
        exclude_if=lambda value: value is None,
        description="present only when review.show_patient_identifiers is on",
    )


# --- /api/findings/{finding_id}/decision ---------------------------------------------------------------


class DecisionIn(_Public):
    model_config = ConfigDict(extra="ignore")

    decision: str = Field(description="confirm | reject | correct | comment")
    to_answer: str | None = Field(default=None, description="correct: the right answer (closed: yes or no)")
    comment: str | None = None


class DecisionRecorded(_Public):
    review_id: int
    finding_id: int
    review_state: ReviewStateName = Field(description="the finding's review state after this decision")
    corrected_answer: str | None


# --- /api/cohort -------------------------------------------------------------------------------------


class CohortPublic(_Public):
    where: str
    per: Literal["study", "image"]
    count: int
    rows: list[dict[str, Any]] = Field(
        description="one per study (study_id, study_date, modalities, body_part, accession_hash) or image "
        "(image_id, study_id, study_date, modality, body_part, view, ct_window, frame, render_version, url), "
        "with p_QUESTION (the highest P(yes)) and answer_QUESTION (after review) for each question answered"
    )
    model_version_ids: list[int]
    question_bank_versions: list[str]


class Health(_Public):
    status: Literal["ok"] = "ok"
