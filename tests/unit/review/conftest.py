"""Fixtures of the review app's tests: a seeded database (tests/review_seed.py) and a factory of review
apps over it, with a clock the tests move forward instead of sleeping."""

from __future__ import annotations

import datetime as dt

import pytest

from db.models import utcnow
from review.app import ReviewConfig, create_app
from tests.review_seed import CRITICAL, TEXTS, seeded_database


class Clock:
    """A clock the tests move forward (lock expiry) instead of sleeping."""

    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


@pytest.fixture
def make_app(tmp_path):
    """A seeded database and a factory of review apps over it (config overrides as keyword arguments)."""
    engine, store, seeded = seeded_database(tmp_path)
    clock = Clock()

    def make(**overrides):
        config = {"secret": "s" * 40, "critical_ids": CRITICAL, "question_texts": TEXTS, "page_size": 4, "clock": clock}
        return create_app(engine=engine, store=store, config=ReviewConfig(**(config | overrides)))

    make.engine, make.seeded, make.clock = engine, seeded, clock
    make.url = f"sqlite:///{tmp_path / 'seeded.db'}"
    yield make
    engine.dispose()


@pytest.fixture
def env(make_app):
    return make_app.engine, make_app.seeded, make_app()
