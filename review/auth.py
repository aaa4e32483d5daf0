"""Passwords (argon2id via pwdlib), signed bearer tokens, CSRF tokens."""

from __future__ import annotations

import hmac
import secrets

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer
from pwdlib import PasswordHash

_hasher = PasswordHash.recommended()  # argon2id
# a hash to verify against when the user does not exist, so timing does not tell names apart
_DUMMY_HASH = _hasher.hash("nightread-no-such-user")
MIN_PASSWORD_LENGTH = 8


def hash_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValueError(f"a password has at least {MIN_PASSWORD_LENGTH} characters")
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
    """Bearer tokens for /api: the user id, signed and time-stamped (checked against the database on use)."""

    def __init__(self, secret: str, ttl_s: int) -> None:
        self._s = URLSafeTimedSerializer(secret, salt="nightread-api-token")
        self.ttl_s = ttl_s

    def issue(self, user_id: int) -> str:
        return self._s.dumps({"uid": user_id})

    def read(self, token: str) -> int | None:
        try:
            data = self._s.loads(token, max_age=self.ttl_s)
        except (BadSignature, SignatureExpired):
            return None
        uid = data.get("uid") if isinstance(data, dict) else None
        return uid if isinstance(uid, int) else None


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)


def csrf_ok(expected: str | None, given: str | None) -> bool:
    return bool(expected) and bool(given) and hmac.compare_digest(str(expected), str(given))
