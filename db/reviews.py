"""Review data: users, sessions, login throttling, the flag queue, a study's findings, decisions
(append-only) and the audit log (append-only).

Keyword-only arguments and an explicit `session`, no commits here, like `db.repository`. A finding's
review state is its latest confirm / reject / correct decision; comments do not change it. Every change
to a user writes an audit event naming who made it (`actor`); the audit log never holds a password or
patient data. A refusal raises one of the `ReviewError` kinds below (`NotAllowed`, `NotFound`,
`InvalidDecision`, `InvalidUserChange`, `UserExists`), never a built-in exception."""

from __future__ import annotations

import csv
import datetime as dt
import getpass
import hashlib
import os
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TextIO

from sqlalchemy import ColumnElement, delete, exists, func, literal_column, or_
from sqlalchemy import select as sa_select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import aliased
from sqlmodel import Session, col, select

from db.models import (
    AppUser,
    AuditAction,
    AuditEvent,
    Decision,
    Finding,
    Image,
    LoginThrottle,
    ModelVersion,
    Review,
    Role,
    Study,
    UserSession,
    utcnow,
)

State = Literal["pending", "confirmed", "rejected", "corrected", "any"]
Order = Literal["critical", "uncertain"]
STATE_OF_DECISION = {Decision.CONFIRM: "confirmed", Decision.REJECT: "rejected", Decision.CORRECT: "corrected"}
DECISION_OF_STATE = {v: k for k, v in STATE_OF_DECISION.items()}
SYSTEM_ACTOR = "system"  # code acting on its own (seeds, migrations of data), not a person


# --- errors: what a caller may refuse, by kind (the review app maps each kind to an HTTP status) ---------


class ReviewError(Exception):
    """A decision or user change that is refused; the message says why (user names and database ids
    only, never patient data). Catch this to catch every refusal of this module."""


class NotAllowed(ReviewError):
    """The user may not do this (their role, or a disabled user)."""


class NotFound(ReviewError):
    """What the request names does not exist (a finding, a user)."""


class InvalidDecision(ReviewError):
    """A decision that cannot be recorded as given (unknown kind, a correction without its answer, ...)."""


class InvalidUserChange(ReviewError):
    """A user change that cannot be made as given (an unknown role, a malformed name)."""


class UserExists(ReviewError):
    """A user of that name exists already."""


# --- the audit log -----------------------------------------------------------------------------------


def cli_actor() -> str:
    """Who runs a command line: `cli:` and the operating-system user name."""
    try:
        name = getpass.getuser()
    except (KeyError, OSError):  # no user name for this uid (a bare container): name the uid instead
        name = f"uid{os.getuid()}"
    return f"cli:{name}"[:80]


def audit(
    *,
    session: Session,
    action: str,
    actor: str,
    subject: str | None = None,
    client: str | None = None,
    detail: str | None = None,
    now: dt.datetime | None = None,
) -> AuditEvent:
    """Append one event to the audit log (`AuditAction` names the actions). Never pass a password or
    patient data: user names, database ids, counts and addresses only."""
    row = AuditEvent(
        at=now or utcnow(),
        action=action[:32],
        actor=actor[:80],
        subject=subject[:80] if subject else None,
        client=client[:64] if client else None,
        detail=detail[:1000] if detail else None,
    )
    session.add(row)
    session.flush()
    return row


AUDIT_EVENT_FIELDS = ["id", "at", "action", "actor", "subject", "client", "detail"]


def audit_events(*, session: Session) -> list[dict[str, Any]]:
    """The audit log, oldest first, as rows for `write_csv` (fields `AUDIT_EVENT_FIELDS`)."""
    rows = session.exec(select(AuditEvent).order_by(col(AuditEvent.id))).all()
    return [
        {
            "id": r.id,
            "at": r.at.isoformat(timespec="seconds"),
            "action": r.action,
            "actor": r.actor,
            "subject": r.subject or "",
            "client": r.client or "",
            "detail": r.detail or "",
        }
        for r in rows
    ]


# cells a spreadsheet would run as a formula (OWASP, "CSV injection"): written with a leading '
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """A cell that a spreadsheet shows as text: a string starting with = + - @ tab or CR gets a leading '."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def write_csv(*, rows: Iterable[dict[str, Any]], fields: Sequence[str], out: TextIO) -> int:
    """Write `rows` as CSV (every cell quoted, formulas neutralised by `csv_cell`); returns the row count."""
    writer = csv.DictWriter(out, fieldnames=list(fields), quoting=csv.QUOTE_ALL)
    writer.writeheader()
    count = 0
    for row in rows:
        writer.writerow({k: csv_cell(v) for k, v in row.items()})
        count += 1
    return count


# --- users -----------------------------------------------------------------------------------------


def _check_role(role: str) -> None:
    if role not in Role.ALL:
        raise InvalidUserChange(f"unknown role {role!r}: use one of {', '.join(Role.ALL)}")


def add_user(*, session: Session, name: str, role: str, password_hash: str, actor: str = SYSTEM_ACTOR) -> AppUser:
    _check_role(role)
    if not name or len(name) > 64 or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise InvalidUserChange("a user name is 1-64 letters, digits, '.', '-' or '_'")
    if session.exec(select(AppUser).where(AppUser.name == name)).first() is not None:
        raise UserExists(f"user {name!r} exists")
    user = AppUser(name=name, role=role, password_hash=password_hash)
    session.add(user)
    session.flush()
    audit(session=session, action=AuditAction.USER_ADDED, actor=actor, subject=name, detail=f"role {role}")
    return user


def get_user(*, session: Session, name: str) -> AppUser | None:
    return session.exec(select(AppUser).where(AppUser.name == name)).first()


def list_users(*, session: Session) -> list[AppUser]:
    return list(session.exec(select(AppUser).order_by(col(AppUser.name))).all())


def _existing_user(session: Session, name: str) -> AppUser:
    user = get_user(session=session, name=name)
    if user is None:
        raise NotFound(f"no user {name!r}")
    return user


def disable_user(*, session: Session, name: str, actor: str = SYSTEM_ACTOR, now: dt.datetime | None = None) -> AppUser:
    """The user can no longer log in; their sessions end and their API tokens stop working."""
    user = _existing_user(session, name)
    now = now or utcnow()
    user.disabled = True
    user.auth_version += 1
    session.add(user)
    assert user.id is not None
    ended = end_user_sessions(session=session, user_id=user.id, reason="disabled", now=now)
    audit(
        session=session, action=AuditAction.USER_DISABLED, actor=actor, subject=name, detail=f"{ended} session(s) ended"
    )
    return user


def enable_user(*, session: Session, name: str, actor: str, now: dt.datetime | None = None) -> AppUser:
    """The user can log in again; a login lock on their name is lifted too."""
    user = _existing_user(session, name)
    was_disabled = user.disabled
    user.disabled = False
    session.add(user)
    refused = unlock(session=session, keys=[user_throttle_key(name)])
    detail = ("was disabled" if was_disabled else "was not disabled") + (
        f"; login lock lifted ({refused} attempt(s) refused during it)" if refused is not None else ""
    )
    audit(session=session, action=AuditAction.USER_ENABLED, actor=actor, subject=name, detail=detail, now=now)
    return user


def set_role(*, session: Session, name: str, role: str, actor: str) -> AppUser:
    """A new role, in force at the user's next request (roles are read from the database every time)."""
    _check_role(role)
    user = _existing_user(session, name)
    old = user.role
    user.role = role
    session.add(user)
    audit(session=session, action=AuditAction.USER_ROLE_SET, actor=actor, subject=name, detail=f"{old} -> {role}")
    return user


def set_password(
    *,
    session: Session,
    name: str,
    password_hash: str,
    actor: str,
    by_admin: bool,
    client: str | None = None,
    now: dt.datetime | None = None,
) -> AppUser:
    """A new password: every session of the user ends and their API tokens stop working. An
    administrator's reset (`by_admin`) also lifts a login lock on the name."""
    user = _existing_user(session, name)
    now = now or utcnow()
    user.password_hash = password_hash
    user.auth_version += 1
    session.add(user)
    assert user.id is not None
    ended = end_user_sessions(session=session, user_id=user.id, reason="password", now=now)
    detail = f"{ended} session(s) ended, API tokens revoked"
    if by_admin:
        refused = unlock(session=session, keys=[user_throttle_key(name)])
        if refused is not None:
            detail += f"; login lock lifted ({refused} attempt(s) refused during it)"
    action = AuditAction.USER_PASSWORD_RESET if by_admin else AuditAction.PASSWORD_CHANGED
    audit(session=session, action=action, actor=actor, subject=name, client=client, detail=detail, now=now)
    return user


# --- sessions of the review page ---------------------------------------------------------------------


def _key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def start_session(*, session: Session, user: AppUser, client: str | None, max_age_s: int, now: dt.datetime) -> str:
    """A new session for `user`; returns its key (for the signed cookie; only its hash is stored).
    Sessions that have expired or ended are deleted on the way."""
    assert user.id is not None
    session.execute(
        delete(UserSession).where(or_(col(UserSession.expires_at) < now, col(UserSession.ended_at).is_not(None)))
    )
    key = secrets.token_urlsafe(32)
    session.add(
        UserSession(
            key_hash=_key_hash(key),
            user_id=user.id,
            client=client[:64] if client else None,
            created_at=now,
            expires_at=now + dt.timedelta(seconds=max_age_s),
        )
    )
    session.flush()
    return key


def user_of_session(*, session: Session, key: str, now: dt.datetime) -> AppUser | None:
    """The user of a live session (not ended, not expired, user not disabled), else None."""
    row = session.exec(select(UserSession).where(UserSession.key_hash == _key_hash(key))).first()
    if row is None or row.ended_at is not None or row.expires_at <= now:
        return None
    user = session.get(AppUser, row.user_id)
    return user if user is not None and not user.disabled else None


def end_session(*, session: Session, key: str, reason: str, now: dt.datetime) -> AppUser | None:
    """End one session; returns its user (None when it was not live)."""
    row = session.exec(select(UserSession).where(UserSession.key_hash == _key_hash(key))).first()
    if row is None or row.ended_at is not None:
        return None
    row.ended_at = now
    row.end_reason = reason
    session.add(row)
    session.flush()
    return session.get(AppUser, row.user_id)


def end_user_sessions(*, session: Session, user_id: int, reason: str, now: dt.datetime) -> int:
    """End every live session of a user; returns how many."""
    rows = session.exec(
        select(UserSession).where(UserSession.user_id == user_id, col(UserSession.ended_at).is_(None))
    ).all()
    live = 0
    for row in rows:
        live += row.expires_at > now
        row.ended_at = now
        row.end_reason = reason
        session.add(row)
    session.flush()
    return live


# --- login throttling ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoginPolicy:
    """How many failed logins a user name or a client address may have in `window_s` before it is
    locked (0: no limit), and for how long: `lockout_s`, doubled for each further lock without a
    successful login in between, at most `max_lockout_s`. An administrator lifts a lock at once
    (`nightread users unlock`)."""

    max_failures_per_user: int = 5
    max_failures_per_address: int = 20
    window_s: int = 900
    lockout_s: int = 900
    max_lockout_s: int = 24 * 3600


def user_throttle_key(name: str) -> str:
    """The throttle key of an existing user's name (names no user has are keyed by an HMAC, see review.auth)."""
    return f"user:{name}"


def address_throttle_key(address: str) -> str:
    return f"addr:{address}"[:80]


def _throttle_row(session: Session, key: str, now: dt.datetime) -> LoginThrottle:
    """The throttle row of `key`, created if missing and locked for this transaction (Postgres)."""
    fresh = LoginThrottle(key=key, failures=0, window_start=now, lockouts=0, refused=0, updated_at=now)
    dialect = session.get_bind().dialect.name
    if dialect in ("postgresql", "sqlite"):  # concurrent first failures of one key must not collide
        insert = pg_insert if dialect == "postgresql" else sqlite_insert
        values = fresh.model_dump(exclude={"locked_until"})
        session.execute(insert(LoginThrottle).values(**values).on_conflict_do_nothing(index_elements=["key"]))
    elif session.get(LoginThrottle, key) is None:
        session.add(fresh)
        session.flush()
    query = select(LoginThrottle).where(LoginThrottle.key == key).with_for_update()
    return session.exec(query.execution_options(populate_existing=True)).one()


def active_lock(*, session: Session, keys: Sequence[str], now: dt.datetime) -> LoginThrottle | None:
    """The longest lock in force on any of `keys`, else None."""
    rows = session.exec(select(LoginThrottle).where(col(LoginThrottle.key).in_(list(keys)))).all()
    locked = [r for r in rows if r.locked_until is not None and r.locked_until > now]
    return max(locked, key=lambda r: r.locked_until or now) if locked else None


def note_refused(*, session: Session, lock: LoginThrottle, now: dt.datetime) -> bool:
    """Count an attempt refused by `lock`; True for the first one of this lock (the one worth auditing)."""
    lock.refused += 1
    lock.updated_at = now
    session.add(lock)
    session.flush()
    return lock.refused == 1


def note_failure(
    *, session: Session, key: str, limit: int, policy: LoginPolicy, now: dt.datetime
) -> dt.datetime | None:
    """Count a failed login on `key`; returns the end of the lock this failure starts, else None."""
    if limit <= 0:
        return None
    # forget names and addresses without a failure for a window plus the longest lock (unless locked)
    stale = now - dt.timedelta(seconds=policy.window_s + policy.max_lockout_s)
    session.execute(
        delete(LoginThrottle).where(
            col(LoginThrottle.updated_at) < stale,
            or_(col(LoginThrottle.locked_until).is_(None), col(LoginThrottle.locked_until) < now),
        )
    )
    row = _throttle_row(session, key, now)
    if row.locked_until is not None and row.locked_until <= now:  # the last lock is over
        row.locked_until = None
        row.refused = 0
    if (now - row.window_start).total_seconds() > policy.window_s:
        row.failures = 0
        row.window_start = now
    row.failures += 1
    row.updated_at = now
    started: dt.datetime | None = None
    if row.failures >= limit:
        row.lockouts += 1
        seconds = min(policy.lockout_s * 2 ** min(row.lockouts - 1, 20), policy.max_lockout_s)
        row.locked_until = started = now + dt.timedelta(seconds=seconds)
        row.failures = 0
        row.refused = 0
        row.window_start = now
    session.add(row)
    session.flush()
    return started


def note_success(*, session: Session, key: str) -> None:
    """A successful login clears its user name's failures and lock history."""
    session.execute(delete(LoginThrottle).where(col(LoginThrottle.key) == key))


def unlock(*, session: Session, keys: Sequence[str], now: dt.datetime | None = None) -> int | None:
    """Lift the locks (and forget the failures) of `keys`; returns how many attempts were refused during
    the locks in force, or None when none was in force."""
    now = now or utcnow()
    rows = session.exec(select(LoginThrottle).where(col(LoginThrottle.key).in_(list(keys)))).all()
    locked = [r for r in rows if r.locked_until is not None and r.locked_until > now]
    session.execute(delete(LoginThrottle).where(col(LoginThrottle.key).in_(list(keys))))
    return sum(r.refused for r in locked) if locked else None


def locked_until(*, session: Session, name: str, now: dt.datetime | None = None) -> dt.datetime | None:
    """When the login lock on a user's name ends, if one is in force."""
    lock = active_lock(session=session, keys=[user_throttle_key(name)], now=now or utcnow())
    return lock.locked_until if lock is not None else None


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


# The queue is read in index order, one segment at a time (flagged critical, flagged other, unflagged
# critical, unflagged other; for `uncertain`, flagged then unflagged), each walked by a partial index of
# closed findings (migration 0013: `ix_finding_queue_critical`, `ix_finding_queue_uncertain`) until the page
# is full, so its first page costs the same at a thousand studies as at a million. A finding's review state
# is read for it alone (index on review.finding_id), never by aggregating every review.
CLOSED: ColumnElement[str] = literal_column(
    "'closed'"
)  # a literal, not a parameter: Postgres proves the partial indexes from it
UNCERTAINTY = func.abs(func.coalesce(col(Finding.probability), literal_column("0.0")) - literal_column("0.5"))


def _decided() -> ColumnElement[bool]:
    """The finding has a confirm / reject / correct decision (comments do not decide)."""
    return exists(
        select(col(Review.id)).where(col(Review.finding_id) == Finding.id, col(Review.decision) != Decision.COMMENT)
    )


def latest_review(column: Literal["decision", "to_answer"] = "decision") -> Any:
    """The `column` of a finding's latest confirm / reject / correct review (None: none, pending), as a
    subquery correlated with `Finding`: read for each finding it is asked of, through the index on
    review.finding_id, where `latest_decisions()` aggregates every review."""
    return (
        select(getattr(Review, column))
        .where(col(Review.finding_id) == Finding.id, col(Review.decision) != Decision.COMMENT)
        .order_by(col(Review.id).desc())
        .limit(1)
        .correlate(Finding)
        .scalar_subquery()
    )


def _queue_conditions(flt: QueueFilter) -> tuple[list[ColumnElement[bool]], bool, bool]:
    """The filter as conditions on Finding (Image and Study joined): (conditions, needs image, needs study)."""
    conditions: list[ColumnElement[bool]] = [col(Finding.kind) == CLOSED]
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
        conditions.append(~_decided())
    elif flt.state != "any":
        conditions.append(latest_review() == DECISION_OF_STATE[flt.state])
    return conditions, bool(flt.modality), bool(flt.date_from or flt.date_to)


def _segments(order: Order, critical_ids: Sequence[str]) -> list[tuple[list[ColumnElement[bool]], list[Any], bool]]:
    """The queue's order as consecutive segments: (conditions, order within, critical) each."""
    flagged = [col(Finding.flagged).is_(True), col(Finding.flagged).is_(False)]
    if order == "uncertain":
        return [([f], [UNCERTAINTY, col(Finding.id)], False) for f in flagged]
    by_p = [col(Finding.probability).desc(), col(Finding.id)]
    if not critical_ids:
        return [([f], by_p, False) for f in flagged]
    critical = col(Finding.question_id).in_(list(critical_ids))
    return [([f, c], by_p, is_c) for f in flagged for c, is_c in ((critical, True), (~critical, False))]


def _queue_rows(
    session: Session, flt: QueueFilter, order: Order, critical_ids: Sequence[str], offset: int, limit: int
) -> list[QueueItem]:
    conditions, _, _ = _queue_conditions(flt)
    decision = latest_review().label("decision")
    needed = offset + limit
    rows: list[tuple[Any, bool]] = []
    for segment, within, critical in _segments(order, critical_ids):
        if len(rows) >= needed:
            break
        query = (
            sa_select(
                col(Finding.id),
                col(Finding.study_id),
                col(Finding.image_id),
                col(Finding.question_id),
                col(Finding.answer),
                col(Finding.probability),
                col(Finding.flagged),
                col(Image.modality),
                col(Study.study_date),
                col(Finding.model_version_id),
                col(ModelVersion.name),
                decision,
            )
            .join(Image, col(Image.id) == Finding.image_id)
            .join(Study, col(Study.id) == Finding.study_id)
            .join(ModelVersion, col(ModelVersion.id) == Finding.model_version_id)
            .where(*conditions, *segment)
            .order_by(*within)
            .limit(needed - len(rows))
        )
        rows += [(r, critical or (bool(critical_ids) and r[3] in critical_ids)) for r in session.execute(query).all()]
    return [
        QueueItem(
            finding_id=r[0],
            study_id=r[1],
            image_id=r[2],
            question_id=r[3],
            answer=r[4],
            probability=r[5],
            flagged=bool(r[6]),
            critical=critical,
            modality=r[7],
            study_date=r[8],
            model_version_id=r[9],
            model_name=r[10],
            state=STATE_OF_DECISION.get(r[11], "pending") if r[11] else "pending",
        )
        for r, critical in rows[offset:needed]
    ]


def _count(session: Session, query: Any, count_limit: int | None) -> int:
    """How many rows `query` (a SELECT of ids) gives; with `count_limit`, counted up to count_limit + 1 only."""
    if count_limit is not None:
        query = query.limit(count_limit + 1)
    return int(session.execute(sa_select(func.count()).select_from(query.subquery())).scalar_one())


def queue(
    *,
    session: Session,
    flt: QueueFilter,
    order: Order,
    critical_ids: Sequence[str],
    offset: int = 0,
    limit: int = 25,
    count_limit: int | None = None,
) -> tuple[list[QueueItem], int]:
    """Flagged findings first, then by the chosen priority: `critical` = critical questions first,
    highest P(yes) first; `uncertain` = P(yes) nearest 0.5 first. Returns (page, total matching).

    The total is exact, which takes a count of every matching finding (a million studies hold some ten
    million); with `count_limit` it is counted up to `count_limit` + 1 only (more than `count_limit`:
    show it as "count_limit+"), and the call costs the same whatever the database's size."""
    items = _queue_rows(session, flt, order, critical_ids, offset, limit)
    conditions, needs_image, needs_study = _queue_conditions(flt)
    ids: Any = sa_select(col(Finding.id))
    if needs_image:
        ids = ids.join(Image, col(Image.id) == Finding.image_id)
    if needs_study:
        ids = ids.join(Study, col(Study.id) == Finding.study_id)
    return items, _count(session, ids.where(*conditions), count_limit)


def queue_counts(*, session: Session, count_limit: int | None = None) -> dict[str, int]:
    """Counts for the top of the queue: flagged findings, and closed findings by review state. With
    `count_limit`, each is counted up to `count_limit` + 1 only (see `queue`)."""
    if count_limit is None:
        decided = latest_decisions()
        rows = session.exec(
            select(decided.c.decision, func.count())
            .select_from(Finding)
            .outerjoin(decided, decided.c.finding_id == Finding.id)
            .where(Finding.kind == "closed")
            .group_by(decided.c.decision)
        ).all()
        by = {STATE_OF_DECISION.get(d, "pending") if d else "pending": int(n) for d, n in rows}
        flagged = int(
            session.exec(select(func.count()).select_from(Finding).where(col(Finding.flagged).is_(True))).one()
        )
    else:
        newer = aliased(Review)
        latest_id = (
            select(func.max(newer.id))
            .where(col(newer.finding_id) == Review.finding_id, col(newer.decision) != Decision.COMMENT)
            .scalar_subquery()
        )
        # review rows of one decision (index on review.decision) that are their closed finding's latest, the
        # latest checked for each row, so the count stops at its limit instead of joining every review. `>=`
        # means `=` here (no later decision exists), but `=` makes Postgres expect a row or two, plan the whole
        # index scan and JIT-compile it (0.1-0.2 s)
        latest_of_kind = {
            state: sa_select(col(Review.id))
            .join(Finding, col(Finding.id) == Review.finding_id)
            .where(col(Review.decision) == decision, col(Finding.kind) == CLOSED, col(Review.id) >= latest_id)
            for decision, state in STATE_OF_DECISION.items()
        }
        pending = sa_select(col(Finding.id)).where(col(Finding.kind) == CLOSED, ~_decided())
        by = {"pending": _count(session, pending, count_limit)}
        by |= {state: _count(session, q, count_limit) for state, q in latest_of_kind.items()}
        flagged = _count(session, sa_select(col(Finding.id)).where(col(Finding.flagged).is_(True)), count_limit)
    return {
        "flagged": flagged,
        "pending": by.get("pending", 0),
        "confirmed": by.get("confirmed", 0),
        "rejected": by.get("rejected", 0),
        "corrected": by.get("corrected", 0),
    }


def queue_ids(*, session: Session, flt: QueueFilter, order: Order, critical_ids: Sequence[str]) -> list[int]:
    """The queue's finding ids in order (its first 1000)."""
    return [i.finding_id for i in _queue_rows(session, flt, order, critical_ids, 0, 1000)]


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


def undecided_flagged(*, session: Session, study_id: int) -> int:
    """How many flagged findings of a study have no confirm / reject / correct decision yet (comments do
    not decide). 0 once QA has given a verdict on every flag of the study."""
    decided = latest_decisions()
    count = session.execute(
        sa_select(func.count())
        .select_from(Finding)
        .outerjoin(decided, decided.c.finding_id == Finding.id)
        .where(col(Finding.study_id) == study_id, col(Finding.flagged).is_(True), decided.c.decision.is_(None))
    ).scalar_one()
    return int(count)


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


def may_decide(user: AppUser) -> bool:
    """Whether `user` may decide on findings: an enabled reviewer or admin."""
    return not user.disabled and user.role in Role.DECIDE


def check_may_decide(user: AppUser) -> None:
    """Raise `NotAllowed` unless `user` may decide on findings."""
    if not may_decide(user):
        raise NotAllowed(f"user {user.name!r} ({user.role}) may not decide on findings")


def decide(
    *,
    session: Session,
    user: AppUser,
    finding_id: int,
    decision: str,
    to_answer: str | None = None,
    comment: str | None = None,
) -> Review:
    """Append one decision. A viewer or a disabled user cannot decide (`NotAllowed`); the finding must
    exist (`NotFound`); `correct` needs the right answer (`InvalidDecision`)."""
    check_may_decide(user)
    if decision not in Decision.ALL:
        raise InvalidDecision(f"unknown decision {decision!r}: use one of {', '.join(Decision.ALL)}")
    finding = session.get(Finding, finding_id)
    if finding is None:
        raise NotFound(f"no finding {finding_id}")
    comment = (comment or "").strip() or None
    to_answer = (to_answer or "").strip() or None
    if decision == Decision.CORRECT:
        if to_answer is None:
            raise InvalidDecision("a correction needs the corrected answer")
        if finding.kind == "closed" and to_answer not in ("yes", "no"):
            raise InvalidDecision("the corrected answer of a closed question is yes or no")
        if len(to_answer) > 255:
            raise InvalidDecision("the corrected answer is at most 255 characters")
    elif decision == Decision.COMMENT and comment is None:
        raise InvalidDecision("a comment needs text")
    if comment is not None and len(comment) > 2000:
        raise InvalidDecision("a comment is at most 2000 characters")
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


AUDIT_DECISION_FIELDS = [
    "review_id",
    "at",
    "user",
    "finding_id",
    "study_id",
    "question_id",
    "model_version_id",
    "decision",
    "from_answer",
    "to_answer",
    "comment",
]


def audit_rows(*, session: Session) -> list[dict[str, Any]]:
    """Every decision, oldest first, with who, when, what and from which value to which (fields
    `AUDIT_DECISION_FIELDS`; write them with `write_csv`: comments are free text)."""
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
