"""Helpers of the review app's tests: sign in through the login form, read a page's CSRF token and queue,
run the `nightread` command line in process on the test's database, read the audit log."""

from __future__ import annotations

import os
import re
from pathlib import Path

from fastapi.testclient import TestClient
from typer.testing import CliRunner

from db import reviews
from db.session import session_scope
from flows.cli import app as cli
from tests.review_seed import PASSWORD

TEMPLATES = Path(__file__).resolve().parents[3] / "review" / "templates"
HUGE = "99999999999999999999"


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "the page carries a CSRF token"
    return match.group(1)


def login(client: TestClient, name: str, password: str = PASSWORD):
    token = csrf_of(client.get("/login").text)
    return client.post(
        "/login", data={"username": name, "password": password, "csrf_token": token}, follow_redirects=False
    )


def queue_ids(html: str) -> list[int]:
    return [int(x) for x in re.findall(r'<tr data-finding="(\d+)"', html)]


def nightread(make_app, *args: str, stdin: str | None = None):
    """The `nightread` command line in process, on the test's database (the process umask it sets for
    its files is put back afterwards)."""
    umask = os.umask(0o022)
    os.umask(umask)
    try:
        return CliRunner().invoke(
            cli, list(args), input=stdin, env={"NIGHTREAD_DATABASE__URL": make_app.url}, catch_exceptions=False
        )
    finally:
        os.umask(umask)


def events(engine, action: str | None = None) -> list[dict]:
    with session_scope(engine) as session:
        rows = reviews.audit_events(session=session)
    return [r for r in rows if action is None or r["action"] == action]


def no_secret_in_audit(engine, *secrets: str) -> None:
    cells = [str(v) for row in events(engine) for v in row.values()]
    for secret in secrets:
        assert not any(secret in cell for cell in cells), f"{secret!r} is in the audit log"
