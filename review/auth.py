"""Passwords (argon2id via pwdlib), signed bearer tokens, CSRF tokens, and the login check: throttled
per user name and per client address, and audited (never the password)."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import math
import secrets
from dataclasses import dataclass

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer
from pwdlib import PasswordHash
from sqlmodel import Session

from db import reviews
from db.models import AppUser, AuditAction

_hasher = PasswordHash.recommended()  # argon2id
# a hash to verify against when the user does not exist, so timing does not tell names apart
_DUMMY_HASH = _hasher.hash("nightread-no-such-user")
MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 1024  # longer input is refused before it reaches argon2
WRONG_CREDENTIALS = "Wrong user name or password."


def hash_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValueError(f"a password has at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise ValueError(f"a password has at most {MAX_PASSWORD_LENGTH} characters")
    return _hasher.hash(password)


def verify_password(password: str, password_hash: str | None) -> bool:
    if password_hash is None:
        _hasher.verify(password, _DUMMY_HASH)
        return False
    try:
        return bool(_hasher.verify(password, password_hash))
    except Exception:  # a malformed stored hash is a failed login, not a server error
        return False


class Tokens:
    """Bearer tokens for /api: the user id and the user's `auth_version`, signed and time-stamped. A
    password change, reset or disable bumps the version in the database, and older tokens stop working."""

    def __init__(self, secret: str, ttl_s: int) -> None:
        self._s = URLSafeTimedSerializer(secret, salt="nightread-api-token")
        self.ttl_s = ttl_s

    def issue(self, user: AppUser) -> str:
        return self._s.dumps({"uid": user.id, "av": user.auth_version})

    def read(self, token: str) -> tuple[int, int] | None:
        """(user id, auth version) of a valid token, else None."""
        try:
            data = self._s.loads(token, max_age=self.ttl_s)
        except (BadSignature, SignatureExpired):
            return None
        if not isinstance(data, dict):
            return None
        uid, av = data.get("uid"), data.get("av")
        return (uid, av) if isinstance(uid, int) and isinstance(av, int) else None


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)


def csrf_ok(expected: str | None, given: str | None) -> bool:
    return bool(expected) and bool(given) and hmac.compare_digest(str(expected), str(given))


# --- the login check ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoginResult:
    """The user (`user` set), or why not: `status` 401 (wrong credentials) or 429 (locked, with
    `retry_after_s`), and the message to show."""

    user: AppUser | None
    status: int = 200
    message: str = ""
    retry_after_s: int | None = None


def _name_digest(secret: str, name: str) -> str:
    """A keyed digest of a login name no user has (it may be a password typed in the wrong field)."""
    return hmac.new(secret.encode(), f"login-name:{name}".encode(), hashlib.sha256).hexdigest()


def _locked(until: dt.datetime, now: dt.datetime) -> LoginResult:
    seconds = max(1, math.ceil((until - now).total_seconds()))
    minutes = math.ceil(seconds / 60)
    return LoginResult(
        user=None,
        status=429,
        message=f"Too many failed logins: try again in {minutes} minute(s), or ask an administrator "
        "to unlock the user (nightread users unlock NAME).",
        retry_after_s=seconds,
    )


def check_login(
    *,
    session: Session,
    username: str,
    password: str,
    client: str | None,
    policy: reviews.LoginPolicy,
    secret: str,
    now: dt.datetime,
    purpose: str,
) -> LoginResult:
    """Check a user name and password. Refused without checking while the name or the client address is
    locked; a failure counts against both and may lock them. Every outcome is written to the audit log
    (`purpose`: page, api or password change; a success only for page and api). The caller commits,
    whatever the result: failures must be counted."""
    user = reviews.get_user(session=session, name=username) if len(username) <= 64 else None
    if user is not None:
        user_key, actor = reviews.user_throttle_key(user.name), user.name
    else:
        digest = _name_digest(secret, username)
        user_key, actor = f"user#{digest[:40]}", f"unknown#{digest[:12]}"
    keys = [user_key] + ([reviews.address_throttle_key(client)] if client else [])

    lock = reviews.active_lock(session=session, keys=keys, now=now)
    if lock is not None and lock.locked_until is not None:
        if reviews.note_refused(session=session, lock=lock, now=now):
            what = "the user name" if lock.key.startswith("user") else "the client address"
            reviews.audit(
                session=session,
                action=AuditAction.LOGIN_REFUSED,
                actor=actor,
                client=client,
                detail=f"{what} is locked until {lock.locked_until.isoformat(timespec='seconds')} ({purpose}); "
                "further attempts during this lock are counted, not logged",
                now=now,
            )
        return _locked(lock.locked_until, now)

    too_long = len(password) > MAX_PASSWORD_LENGTH
    ok = not too_long and verify_password(password, user.password_hash if user else None)
    if user is not None and ok and not user.disabled:
        reviews.note_success(session=session, key=user_key)
        if purpose != "password change":
            reviews.audit(
                session=session, action=AuditAction.LOGIN_OK, actor=actor, client=client, detail=purpose, now=now
            )
        return LoginResult(user=user)

    reason = "unknown user" if user is None else "disabled user" if ok else "wrong password"
    reviews.audit(
        session=session,
        action=AuditAction.LOGIN_FAILED,
        actor=actor,
        client=client,
        detail=f"{reason} ({purpose})",
        now=now,
    )
    limits = [(user_key, policy.max_failures_per_user, "the user name")]
    if client:
        limits.append((reviews.address_throttle_key(client), policy.max_failures_per_address, "the client address"))
    latest: dt.datetime | None = None
    for key, limit, what in limits:
        until = reviews.note_failure(session=session, key=key, limit=limit, policy=policy, now=now)
        if until is not None:
            seconds = round((until - now).total_seconds())
            reviews.audit(
                session=session,
                action=AuditAction.LOGIN_LOCKED,
                actor=actor,
                client=client,
                detail=f"{what} is locked for {seconds} s after {limit} failed logins",
                now=now,
            )
            latest = until if latest is None else max(latest, until)
    if latest is not None:
        return _locked(latest, now)
    return LoginResult(user=None, status=401, message=WRONG_CREDENTIALS)
