"""The QA review page and who may use it: `nightread review`, `users …` and `audit export`. Every change
to a user audits itself (db.reviews); the actor is this command line's user."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from flows.cli._common import console, database, database_session, fail, load_settings, print_json, serve_metrics

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlmodel import Session

    from flows.wiring.settings import NightreadSettings

app = typer.Typer()
users_app = typer.Typer(help="Users of the review page.", no_args_is_help=True)
audit_app = typer.Typer(help="The review audit trail.", no_args_is_help=True)


def build_review_app(settings: NightreadSettings, engine: Engine) -> Any:
    """The review app wired to `engine`, the configured object store and question bank."""
    from flows.rules.questions import load_bank
    from flows.wiring.runtime import build_store
    from flows.writeback import verified_reports_hook
    from integrations.secrets import load_secret
    from review.app import ReviewConfig, create_app

    r = settings.review
    bank = load_bank(settings.questions_file)
    config = ReviewConfig(
        secret=load_secret(r.secret_key.get_secret_value(), settings.data_dir, "review-secret"),
        secure_cookies=r.secure_cookies,
        session_max_age_s=r.session_max_age_s,
        token_ttl_s=r.token_ttl_s,
        show_patient_identifiers=r.show_patient_identifiers,
        page_size=r.page_size,
        critical_ids=tuple(q.id for q in bank.questions if q.critical),
        question_texts={q.id: q.text for q in bank.questions},
        login_max_failures=r.login_max_failures,
        login_max_failures_per_address=r.login_max_failures_per_address,
        login_window_s=r.login_window_s,
        login_lockout_s=r.login_lockout_s,
        api_docs=r.api_docs,
        api_docs_assets=r.api_docs_assets,
        hsts_max_age_s=r.hsts_max_age_s,
        on_study_decided=verified_reports_hook(settings) if r.verified_reports else None,
    )
    return create_app(engine=engine, store=build_store(settings), config=config)


@app.command()
def review(
    host: Annotated[str | None, typer.Option(help="address to listen on (default NIGHTREAD_REVIEW__HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port (default NIGHTREAD_REVIEW__PORT)")] = None,
) -> None:
    """Serve the QA review page (and its /api) until interrupted."""
    import uvicorn

    settings = load_settings()
    with database(settings) as engine:
        application = build_review_app(settings, engine)
        serve_metrics(settings, engine)
        h, p = host or settings.review.host, port if port is not None else settings.review.port
        console.print(
            f"review page on http://{h}:{p}/ (API schema at /openapi.json after logging in; "
            "Swagger UI at /docs only with NIGHTREAD_REVIEW__API_DOCS)"
        )
        uvicorn.run(application, host=h, port=p, log_level="warning", proxy_headers=False)


# --- users ------------------------------------------------------------------------------------------


def _read_new_password(password_stdin: bool) -> str:
    """A new password from stdin (`--password-stdin`, one line) or a hidden prompt asked twice; never echoed."""
    if password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    return str(typer.prompt("password", hide_input=True, confirmation_prompt=True))


def _hashed_new_password(password_stdin: bool) -> str:
    """The argon2id hash of a new password; a password the policy refuses exits 2 with the reason."""
    from review.auth import hash_password

    try:
        return hash_password(_read_new_password(password_stdin))
    except ValueError as exc:
        raise fail(str(exc), 2) from None


@contextmanager
def _user_change() -> Iterator[tuple[Session, str]]:
    """A session for one of db.reviews' user changes and this command line's user as the actor (the
    change audits itself); committed at the end, and a refused change exits 2 with the reason."""
    from db import reviews

    try:
        with database_session() as session:
            yield session, reviews.cli_actor()
    except reviews.ReviewError as exc:
        raise fail(str(exc), 2) from None


@users_app.command("add")
def users_add(
    name: Annotated[str, typer.Argument(help="user name")],
    role: Annotated[str, typer.Option(help="reviewer | viewer | admin")] = "reviewer",
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="read the password from stdin")] = False,
) -> None:
    """Add a user; the password comes from stdin (`--password-stdin`) or a hidden prompt. Audited."""
    from db import reviews

    hashed = _hashed_new_password(password_stdin)
    with _user_change() as (session, actor):
        reviews.add_user(session=session, name=name, role=role, password_hash=hashed, actor=actor)
    console.print(f"user {name} added ({role})")


@users_app.command("list")
def users_list(as_json: Annotated[bool, typer.Option("--json", help="one JSON array")] = False) -> None:
    """Every user with role and state, and the end of a login lock in force (never a password hash)."""
    from db import reviews

    with database_session() as session:
        rows: list[dict[str, Any]] = []
        for u in reviews.list_users(session=session):
            until = reviews.locked_until(session=session, name=u.name)
            rows.append(
                {
                    "name": u.name,
                    "role": u.role,
                    "disabled": u.disabled,
                    "locked_until": until.isoformat(timespec="seconds") if until else None,
                    "created_at": u.created_at.isoformat(),
                }
            )
    if as_json:
        print_json(rows)
        return
    table = Table(title="users")
    for column in ("name", "role", "state", "created"):
        table.add_column(column)
    for r in rows:
        state = "disabled" if r["disabled"] else "active"
        if r["locked_until"]:
            state += f", locked until {r['locked_until']}"
        table.add_row(r["name"], r["role"], state, r["created_at"][:19])
    console.print(table)


@users_app.command("disable")
def users_disable(name: Annotated[str, typer.Argument(help="user name")]) -> None:
    """Disable a user: they can no longer log in, and their sessions and tokens stop working. Audited."""
    from db import reviews

    with _user_change() as (session, actor):
        reviews.disable_user(session=session, name=name, actor=actor)
    console.print(f"user {name} disabled")


@users_app.command("enable")
def users_enable(name: Annotated[str, typer.Argument(help="user name")]) -> None:
    """Enable a disabled user again (and lift a login lock on the name). Audited."""
    from db import reviews

    with _user_change() as (session, actor):
        reviews.enable_user(session=session, name=name, actor=actor)
    console.print(f"user {name} enabled")


@users_app.command("set-role")
def users_set_role(
    name: Annotated[str, typer.Argument(help="user name")],
    role: Annotated[str, typer.Argument(help="reviewer | viewer | admin")],
) -> None:
    """Give a user another role (in force at their next request). Audited."""
    from db import reviews

    with _user_change() as (session, actor):
        reviews.set_role(session=session, name=name, role=role, actor=actor)
    console.print(f"user {name} is now {role}")


@users_app.command("reset-password")
def users_reset_password(
    name: Annotated[str, typer.Argument(help="user name")],
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="read the password from stdin")] = False,
) -> None:
    """Set a new password (stdin or a hidden prompt): the user's sessions end, their API tokens stop
    working, and a login lock on the name is lifted. Audited."""
    from db import reviews

    hashed = _hashed_new_password(password_stdin)
    with _user_change() as (session, actor):
        reviews.set_password(session=session, name=name, password_hash=hashed, actor=actor, by_admin=True)
    console.print(f"password of {name} reset; their sessions and API tokens no longer work")


@users_app.command("unlock")
def users_unlock(
    name: Annotated[str | None, typer.Argument(help="user name whose login lock to lift")] = None,
    address: Annotated[str | None, typer.Option(help="also lift the lock on this client address")] = None,
) -> None:
    """Lift a login lock (too many failed logins) on a user name, a client address, or both. Audited."""
    from db import reviews
    from db.models import AuditAction

    if name is None and address is None:
        raise fail("name a user, or give --address", 2)
    with database_session() as session:
        if name is not None and reviews.get_user(session=session, name=name) is None:
            raise fail(f"no user {name!r}", 2)
        for subject, key in (
            (name, reviews.user_throttle_key(name) if name else None),
            (address, reviews.address_throttle_key(address) if address else None),
        ):
            if subject is None or key is None:
                continue
            refused = reviews.unlock(session=session, keys=[key])
            detail = "was not locked" if refused is None else f"lock lifted; {refused} attempt(s) refused during it"
            reviews.audit(
                session=session,
                action=AuditAction.USER_UNLOCKED,
                actor=reviews.cli_actor(),
                subject=subject,
                client="cli",
                detail=detail,
            )
            console.print(f"{subject}: {detail}")


# --- the audit trail --------------------------------------------------------------------------------


@audit_app.command("export")
def audit_export(
    out: Annotated[Path, typer.Option("--out", help="CSV file to write ('-' for stdout)")] = Path("-"),
    events: Annotated[
        bool, typer.Option("--events", help="the audit log (logins, user changes, exports) instead of the decisions")
    ] = False,
) -> None:
    """Every review decision (who, when, what, from which answer to which), or with --events the audit log,
    as CSV, oldest first. Cells a spreadsheet would run as formulas start with a '. Audited."""
    from db import reviews
    from db.models import AuditAction

    with database_session() as session:
        rows = reviews.audit_events(session=session) if events else reviews.audit_rows(session=session)
        what = "audit event(s)" if events else "decision(s)"
        reviews.audit(
            session=session,
            action=AuditAction.AUDIT_EXPORTED,
            actor=reviews.cli_actor(),
            client="cli",
            detail=f"{len(rows)} {what} to {'stdout' if str(out) == '-' else 'a file'}",
        )
    fields = reviews.AUDIT_EVENT_FIELDS if events else reviews.AUDIT_DECISION_FIELDS
    if str(out) == "-":
        reviews.write_csv(rows=rows, fields=fields, out=sys.stdout)
        return
    with out.open("w", newline="", encoding="utf-8") as fh:
        reviews.write_csv(rows=rows, fields=fields, out=fh)
    console.print(f"{len(rows)} {what} written to {out}")


app.add_typer(users_app, name="users")
app.add_typer(audit_app, name="audit")
