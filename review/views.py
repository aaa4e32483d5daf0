"""What the pages and the API show, read once and rendered twice (Jinja2 templates, the JSON models of
`review.models`): the queue's filter from query parameters, a page of the queue, and a study with its
images, captions, findings, review states and decision history."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from fastapi import HTTPException
from sqlmodel import Session, col, select

from db import reviews
from db.cohort import MAX_ID
from db.models import Caption, Finding, Image, Review, Study, StudyIdentity

QUEUE_PARAMS = ("order", "modality", "question", "date_from", "date_to", "model_version", "state", "flagged_only")
QUEUE_STATES = ("pending", "confirmed", "rejected", "corrected", "any")
QUEUE_ORDERS = ("critical", "uncertain")
MAX_PAGE = 100_000
MAX_PAGE_SIZE = 500
# the queue's total and counts are counted this far (past the page asked for), never to the end: an exact
# count reads every pending finding (ten million in a year of a big hospital's studies: seconds a page), a
# capped one costs the same at any size (docs/benchmarks.md, P5). More than that shows as "1,000+".
COUNT_LIMIT = 1000


def queue_filter(params: Mapping[str, str]) -> tuple[reviews.QueueFilter, reviews.Order]:
    """The queue's filter and order from the page's (or the API's) query parameters; 400 naming a bad one."""
    state = params.get("state") or "pending"
    if state not in QUEUE_STATES:
        raise HTTPException(400, f"unknown review state {state!r}: use pending, confirmed, rejected, corrected or any")
    order = params.get("order") or "critical"
    if order not in QUEUE_ORDERS:
        raise HTTPException(400, f"unknown order {order!r}: use critical or uncertain")
    mv = params.get("model_version") or None
    for key in ("date_from", "date_to"):
        value = params.get(key) or ""
        if value and not (len(value.replace("-", "")) == 8 and value.replace("-", "").isdigit()):
            raise HTTPException(400, f"{key} is a date YYYY-MM-DD")
    try:
        mv_id = int(mv) if mv else None
    except ValueError:
        raise HTTPException(400, "model_version is a whole number") from None
    if mv_id is not None and not 1 <= mv_id <= MAX_ID:
        raise HTTPException(400, f"model_version is between 1 and {MAX_ID}")
    flt = reviews.QueueFilter(
        modality=params.get("modality") or None,
        question_id=params.get("question") or None,
        date_from=(params.get("date_from") or "").replace("-", "") or None,
        date_to=(params.get("date_to") or "").replace("-", "") or None,
        model_version_id=mv_id,
        state=state,  # type: ignore[arg-type]
        flagged_only=(params.get("flagged_only") or "") in ("1", "true", "on"),
    )
    return flt, order  # type: ignore[return-value]


def queue_query_string(params: Mapping[str, str]) -> str:
    """The queue's filter as a query string (carried from the queue to a study and back)."""
    return urlencode({k: params[k] for k in QUEUE_PARAMS if params.get(k)})


@dataclass(frozen=True)
class QueueView:
    items: list[reviews.QueueItem]
    total: int  # counted up to this page and COUNT_LIMIT findings past it; more when `more`
    more: bool
    page: int
    pages: int  # the pages `total` fills (more follow when `more`)
    counts: dict[str, int]  # each counted up to COUNT_LIMIT + 1: more than COUNT_LIMIT when above it
    order: reviews.Order
    flt: reviews.QueueFilter

    def context(self) -> dict[str, Any]:
        """The template variables (items, total, more, page, pages, counts, order, flt, and `shown`: a count
        as the page prints it)."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__} | {"shown": shown_count}


def shown_count(n: int, limit: int | None = None, more: bool = False) -> str:
    """A count as the page prints it: "1,000+" past the limit it was counted to (COUNT_LIMIT by default)."""
    limit = COUNT_LIMIT if limit is None else limit
    return f"{limit:,}+" if more or n > limit else f"{n:,}"


def queue_view(
    *, session: Session, params: Mapping[str, str], page: int, size: int, critical_ids: tuple[str, ...]
) -> QueueView:
    """One page (`size` findings) of the queue as the parameters filter and order it."""
    flt, order = queue_filter(params)
    offset = (page - 1) * size
    counted_to = offset + size + COUNT_LIMIT  # this page and COUNT_LIMIT findings past it
    items, counted = reviews.queue(
        session=session,
        flt=flt,
        order=order,
        critical_ids=critical_ids,
        offset=offset,
        limit=size,
        count_limit=counted_to,
    )
    total = min(counted, counted_to)
    return QueueView(
        items=items,
        total=total,
        more=counted > counted_to,
        page=page,
        pages=max(1, -(-total // size)),
        counts=reviews.queue_counts(session=session, count_limit=COUNT_LIMIT),
        order=order,
        flt=flt,
    )


@dataclass(frozen=True)
class ImageEntry:
    image: Image
    captions: list[Caption]
    findings: list[Finding]


@dataclass(frozen=True)
class StudyView:
    study: Study
    images: list[ImageEntry]  # those with a caption or a finding, in id order
    states: dict[int, tuple[str, str | None]]  # finding id -> (review state, corrected answer)
    identity: StudyIdentity | None  # only with show_patient_identifiers
    history: list[tuple[Review, str]]  # every decision on the study's findings, and who made it

    def context(self) -> dict[str, Any]:
        """The template variables (study, images, states, identity, history)."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def study_view(*, session: Session, study_id: int, show_identifiers: bool) -> StudyView:
    """A study's images, captions, findings and their review; `reviews.NotFound` (404) without the study."""
    study = session.get(Study, study_id)
    if study is None:
        raise reviews.NotFound(f"no study {study_id}")
    images = session.exec(select(Image).where(Image.study_id == study_id).order_by(col(Image.id))).all()
    image_ids = [i.id for i in images]
    captions = session.exec(select(Caption).where(col(Caption.image_id).in_(image_ids))).all()
    findings = session.exec(
        select(Finding).where(Finding.study_id == study_id).order_by(col(Finding.image_id), col(Finding.id))
    ).all()
    finding_ids = [f.id for f in findings if f.id is not None]
    by_image = {i.id: ImageEntry(image=i, captions=[], findings=[]) for i in images if i.id is not None}
    for c in captions:
        by_image[c.image_id].captions.append(c)
    for f in findings:
        by_image[f.image_id].findings.append(f)
    return StudyView(
        study=study,
        images=[e for e in by_image.values() if e.captions or e.findings],
        states=reviews.finding_states(session=session, finding_ids=finding_ids),
        identity=session.get(StudyIdentity, study_id) if show_identifiers else None,
        history=reviews.history(session=session, finding_ids=finding_ids),
    )
