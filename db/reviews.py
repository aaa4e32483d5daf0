"""Review data: users, the flag queue, a study's findings, decisions (append-only) and the audit trail.

Keyword-only arguments and an explicit `session`, no commits here, like `db.repository`. A finding's
review state is its latest confirm / reject / correct decision; comments do not change it."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import ColumnElement, Select, and_, case, func
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from db.models import AppUser, Decision, Finding, Image, ModelVersion, Review, Role, Study, utcnow

State = Literal["pending", "confirmed", "rejected", "corrected", "any"]
Order = Literal["critical", "uncertain"]
STATE_OF_DECISION = {Decision.CONFIRM: "confirmed", Decision.REJECT: "rejected", Decision.CORRECT: "corrected"}
DECISION_OF_STATE = {v: k for k, v in STATE_OF_DECISION.items()}


class ReviewError(ValueError):
    """A decision or user change that is not allowed; the message says why."""


# --- users -----------------------------------------------------------------------------------------


def add_user(*, session: Session, name: str, role: str, password_hash: str) -> AppUser:
    if role not in Role.ALL:
        raise ReviewError(f"unknown role {role!r}: use one of {', '.join(Role.ALL)}")
    if not name or len(name) > 64 or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ReviewError("a user name is 1-64 letters, digits, '.', '-' or '_'")
    if session.exec(select(AppUser).where(AppUser.name == name)).first() is not None:
        raise ReviewError(f"user {name!r} exists")
    user = AppUser(name=name, role=role, password_hash=password_hash)
    session.add(user)
    session.flush()
    return user


def get_user(*, session: Session, name: str) -> AppUser | None:
    return session.exec(select(AppUser).where(AppUser.name == name)).first()


def list_users(*, session: Session) -> list[AppUser]:
    return list(session.exec(select(AppUser).order_by(col(AppUser.name))).all())


def disable_user(*, session: Session, name: str) -> AppUser:
    user = get_user(session=session, name=name)
    if user is None:
        raise ReviewError(f"no user {name!r}")
    user.disabled = True
    session.add(user)
    return user


# --- review state ------------------------------------------------------------------------------------


def latest_decisions() -> Any:
    """finding_id -> the decision of its latest confirm/reject/correct review row (a subquery)."""
    latest = (
        select(Review.finding_id, func.max(Review.id).label("review_id"))
        .where(col(Review.decision) != Decision.COMMENT)
        .group_by(col(Review.finding_id))
        .subquery()
    )
    return (
        select(Review.finding_id, Review.decision, Review.to_answer)
        .join(latest, col(Review.id) == latest.c.review_id)
        .subquery()
    )


@dataclass(frozen=True)
class QueueFilter:
    modality: str | None = None
    question_id: str | None = None
    date_from: str | None = None  # YYYYMMDD (study date)
    date_to: str | None = None
    model_version_id: int | None = None
    state: State = "pending"
    flagged_only: bool = False


@dataclass(frozen=True)
class QueueItem:
    finding_id: int
    study_id: int
    image_id: int
    question_id: str
    answer: str
    probability: float | None
    flagged: bool
    critical: bool
    modality: str
    study_date: str | None
    model_version_id: int
    model_name: str
    state: str


def _queue_query(flt: QueueFilter, critical_ids: Sequence[str]) -> tuple[Select[Any], Any]:
    decided = latest_decisions()
    is_critical = case((col(Finding.question_id).in_(list(critical_ids) or [""]), 1), else_=0)
    query = (
        sa_select(
            col(Finding.id),
            col(Finding.study_id),
            col(Finding.image_id),
            col(Finding.question_id),
            col(Finding.answer),
            col(Finding.probability),
            col(Finding.flagged),
            is_critical.label("critical"),
            col(Image.modality),
            col(Study.study_date),
            col(Finding.model_version_id),
            col(ModelVersion.name),
            decided.c.decision,
        )
        .join(Image, col(Image.id) == Finding.image_id)
        .join(Study, col(Study.id) == Finding.study_id)
        .join(ModelVersion, col(ModelVersion.id) == Finding.model_version_id)
        .outerjoin(decided, decided.c.finding_id == Finding.id)
        .where(col(Finding.kind) == "closed")
    )
    conditions: list[ColumnElement[bool]] = []
    if flt.modality:
        conditions.append(col(Image.modality) == flt.modality.upper())
    if flt.question_id:
        conditions.append(col(Finding.question_id) == flt.question_id)
    if flt.date_from:
        conditions.append(col(Study.study_date) >= flt.date_from)
    if flt.date_to:
        conditions.append(col(Study.study_date) <= flt.date_to)
    if flt.model_version_id is not None:
        conditions.append(col(Finding.model_version_id) == flt.model_version_id)
    if flt.flagged_only:
        conditions.append(col(Finding.flagged).is_(True))
    if flt.state == "pending":
        conditions.append(decided.c.decision.is_(None))
    elif flt.state != "any":
        conditions.append(decided.c.decision == DECISION_OF_STATE[flt.state])
    if conditions:
        query = query.where(and_(*conditions))
    return query, is_critical


def queue(
    *,
    session: Session,
    flt: QueueFilter,
    order: Order,
    critical_ids: Sequence[str],
    offset: int = 0,
    limit: int = 25,
) -> tuple[list[QueueItem], int]:
    """Flagged findings first, then by the chosen priority: `critical` = critical questions first,
    highest P(yes) first; `uncertain` = P(yes) nearest 0.5 first. Returns (page, total matching)."""
    query, is_critical = _queue_query(flt, critical_ids)
    total = int(session.execute(sa_select(func.count()).select_from(query.subquery())).scalar_one())
    flagged_first = case((col(Finding.flagged).is_(True), 0), else_=1)
    if order == "uncertain":
        ordering = [flagged_first, func.abs(func.coalesce(Finding.probability, 0.0) - 0.5), col(Finding.id)]
    else:
        ordering = [flagged_first, is_critical.desc(), col(Finding.probability).desc(), col(Finding.id)]
    rows = session.execute(query.order_by(*ordering).offset(offset).limit(limit)).all()
    items = [
        QueueItem(
            finding_id=r[0],
            study_id=r[1],
            image_id=r[2],
            question_id=r[3],
            answer=r[4],
            probability=r[5],
            flagged=bool(r[6]),
            critical=bool(r[7]),
            modality=r[8],
            study_date=r[9],
            model_version_id=r[10],
            model_name=r[11],
            state=STATE_OF_DECISION.get(r[12], "pending") if r[12] else "pending",
        )
        for r in rows
    ]
    return items, total


def queue_counts(*, session: Session) -> dict[str, int]:
    """Counts for the top of the queue: flagged findings, and closed findings by review state."""
    decided = latest_decisions()
    rows = session.exec(
        select(decided.c.decision, func.count())
        .select_from(Finding)
        .outerjoin(decided, decided.c.finding_id == Finding.id)
        .where(Finding.kind == "closed")
        .group_by(decided.c.decision)
    ).all()
    by = {STATE_OF_DECISION.get(d, "pending") if d else "pending": int(n) for d, n in rows}
    flagged = int(session.exec(select(func.count()).select_from(Finding).where(col(Finding.flagged).is_(True))).one())
    return {
        "flagged": flagged,
        "pending": by.get("pending", 0),
        "confirmed": by.get("confirmed", 0),
        "rejected": by.get("rejected", 0),
        "corrected": by.get("corrected", 0),
    }


def queue_ids(*, session: Session, flt: QueueFilter, order: Order, critical_ids: Sequence[str]) -> list[int]:
    """The queue's finding ids in order (its first 1000)."""
    items, _ = queue(session=session, flt=flt, order=order, critical_ids=critical_ids, limit=1000)
    return [i.finding_id for i in items]


def next_after(ids: Sequence[int], after: int) -> int | None:
    """The finding that follows `after` in a queue (or its first one when `after` left it)."""
    if after in ids:
        index = ids.index(after)
        return ids[index + 1] if index + 1 < len(ids) else None
    return ids[0] if ids else None


def finding_states(*, session: Session, finding_ids: Sequence[int]) -> dict[int, tuple[str, str | None]]:
    """finding id -> (review state, corrected answer)."""
    if not finding_ids:
        return {}
    decided = latest_decisions()
    rows = session.exec(
        select(decided.c.finding_id, decided.c.decision, decided.c.to_answer).where(
            decided.c.finding_id.in_(list(finding_ids))
        )
    ).all()
    out: dict[int, tuple[str, str | None]] = {f: ("pending", None) for f in finding_ids}
    out.update({r[0]: (STATE_OF_DECISION[r[1]], r[2]) for r in rows})
    return out


def history(*, session: Session, finding_ids: Sequence[int]) -> list[tuple[Review, str]]:
    if not finding_ids:
        return []
    rows = session.exec(
        select(Review, AppUser.name)
        .join(AppUser, col(AppUser.id) == Review.user_id)
        .where(col(Review.finding_id).in_(list(finding_ids)))
        .order_by(col(Review.id))
    ).all()
    return [(r, n) for r, n in rows]


# --- decisions ---------------------------------------------------------------------------------------


def decide(
    *,
    session: Session,
    user: AppUser,
    finding_id: int,
    decision: str,
    to_answer: str | None = None,
    comment: str | None = None,
) -> Review:
    """Append one decision. A viewer or a disabled user cannot decide; `correct` needs the right answer."""
    if user.disabled or user.role not in Role.DECIDE:
        raise PermissionError(f"user {user.name!r} ({user.role}) may not decide on findings")
    if decision not in Decision.ALL:
        raise ReviewError(f"unknown decision {decision!r}: use one of {', '.join(Decision.ALL)}")
    finding = session.get(Finding, finding_id)
    if finding is None:
        raise ReviewError(f"no finding {finding_id}")
    comment = (comment or "").strip() or None
    to_answer = (to_answer or "").strip() or None
    if decision == Decision.CORRECT:
        if to_answer is None:
            raise ReviewError("a correction needs the corrected answer")
        if finding.kind == "closed" and to_answer not in ("yes", "no"):
            raise ReviewError("the corrected answer of a closed question is yes or no")
        if len(to_answer) > 255:
            raise ReviewError("the corrected answer is at most 255 characters")
    elif decision == Decision.COMMENT and comment is None:
        raise ReviewError("a comment needs text")
    if comment is not None and len(comment) > 2000:
        raise ReviewError("a comment is at most 2000 characters")
    current = finding_states(session=session, finding_ids=[finding_id])[finding_id]
    from_answer = current[1] if current[0] == "corrected" and current[1] else finding.answer
    assert user.id is not None
    row = Review(
        finding_id=finding_id,
        user_id=user.id,
        decision=decision,
        from_answer=from_answer[:255] if from_answer else None,
        to_answer=to_answer if decision == Decision.CORRECT else None,
        comment=comment,
        created_at=utcnow(),
    )
    session.add(row)
    session.flush()
    return row


def audit_rows(*, session: Session) -> list[dict[str, Any]]:
    """Every decision, oldest first, with who, when, what and from which value to which."""
    rows = session.execute(
        sa_select(
            Review, col(AppUser.name), col(Finding.study_id), col(Finding.question_id), col(Finding.model_version_id)
        )
        .join(AppUser, col(AppUser.id) == Review.user_id)
        .join(Finding, col(Finding.id) == Review.finding_id)
        .order_by(col(Review.id))
    ).all()
    return [
        {
            "review_id": r.id,
            "at": r.created_at.isoformat(timespec="seconds")
            if isinstance(r.created_at, dt.datetime)
            else str(r.created_at),
            "user": name,
            "finding_id": r.finding_id,
            "study_id": study_id,
            "question_id": question_id,
            "model_version_id": mv_id,
            "decision": r.decision,
            "from_answer": r.from_answer or "",
            "to_answer": r.to_answer or "",
            "comment": r.comment or "",
        }
        for r, name, study_id, question_id, mv_id in rows
    ]


def labels(*, session: Session) -> dict[int, str]:
    """Review decisions as labels for validation: finding id -> the answer a reviewer holds right.
    confirm: the model's answer; correct: the corrected one; reject: the other one (closed questions
    only: a rejected open answer says what is wrong, not what is right, and gives no label)."""
    decided = latest_decisions()
    rows = session.execute(
        sa_select(
            col(Finding.id), col(Finding.kind), col(Finding.answer), decided.c.decision, decided.c.to_answer
        ).join(decided, decided.c.finding_id == Finding.id)
    ).all()
    out: dict[int, str] = {}
    for fid, kind, answer, decision, to_answer in rows:
        if decision == Decision.CONFIRM:
            out[fid] = answer
        elif decision == Decision.CORRECT and to_answer:
            out[fid] = to_answer
        elif decision == Decision.REJECT and kind == "closed":
            out[fid] = "no" if answer == "yes" else "yes"
    return out
