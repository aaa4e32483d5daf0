"""What other parts of nightread hear from the review app: `ReviewConfig.on_study_decided(study_id)` once
QA has given a verdict on every flagged finding of a study (e.g. to write the verdicts as a new DICOM SR
version). It runs as a background task after the response, so a decision is never slowed down or
refused by it; its exceptions are logged (class and study id, no message: it may hold patient data)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi import BackgroundTasks
from sqlmodel import Session

from db import reviews
from db.models import Decision, Finding
from review.config import ReviewConfig

log = logging.getLogger(__name__)


def after_decision(
    background: BackgroundTasks, *, session: Session, config: ReviewConfig, finding_id: int, decision: str
) -> int | None:
    """Schedule `config.on_study_decided` after a committed decision on `finding_id` when it was a verdict
    (not a comment) and no flagged finding of its study is left undecided; returns the study id then."""
    hook = config.on_study_decided
    if hook is None or decision == Decision.COMMENT:
        return None
    finding = session.get(Finding, finding_id)
    if finding is None or reviews.undecided_flagged(session=session, study_id=finding.study_id) > 0:
        return None
    background.add_task(call_study_decided, hook, finding.study_id)
    return finding.study_id


def call_study_decided(hook: Callable[[int], None], study_id: int) -> None:
    """Run the hook; a failure is logged for the operator and goes no further (the decision is recorded)."""
    try:
        hook(study_id)
    except Exception as exc:
        log.error("on_study_decided failed for study %d: %s", study_id, type(exc).__qualname__)
