"""What a review app is built with (`create_app(config=...)`): plain values, built at the edge by the
command line from `NightreadSettings.review`, never read at import time."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from db import reviews
from db.models import utcnow


@dataclass(frozen=True)
class ReviewConfig:
    secret: str
    secure_cookies: bool = False
    session_max_age_s: int = 8 * 3600
    token_ttl_s: int = 3600
    show_patient_identifiers: bool = False
    page_size: int = 25
    critical_ids: tuple[str, ...] = ()
    question_texts: Mapping[str, str] | None = None
    # login throttling (db.reviews.LoginPolicy): failures per user name / per client address in the window
    # before a lock (0: no limit), and the first lock's length (doubled for each further one, at most a day)
    login_max_failures: int = 5
    login_max_failures_per_address: int = 20
    login_window_s: int = 900
    login_lockout_s: int = 900
    # Swagger UI at /docs (behind login), from a local swagger-ui-dist folder only: never from a CDN
    api_docs: bool = False
    api_docs_assets: Path | None = None
    # Strict-Transport-Security max-age, sent only on requests that came over https
    hsts_max_age_s: int = 365 * 24 * 3600
    clock: Callable[[], dt.datetime] = field(default=utcnow, compare=False)  # tests move time forward
    # called with a study id, after the response, once a confirm / reject / correct leaves no flagged
    # finding of that study undecided (again after each later verdict on it; never for a comment). Its
    # exceptions are logged (class and study id only) and never reach the user: make it idempotent.
    on_study_decided: Callable[[int], None] | None = field(default=None, compare=False)

    def login_policy(self) -> reviews.LoginPolicy:
        return reviews.LoginPolicy(
            max_failures_per_user=self.login_max_failures,
            max_failures_per_address=self.login_max_failures_per_address,
            window_s=self.login_window_s,
            lockout_s=self.login_lockout_s,
        )
