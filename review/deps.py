"""The review app's dependencies (FastAPI `Depends`): its state, configuration and a database session;
who is asking (a page's session cookie, or the API's bearer token or cookie); the role and CSRF checks.
Each reads what it needs from `request.app.state.review` (a `ReviewState`, set once by `create_app`),
so the routers are plain module-level `APIRouter`s.

(No `from __future__ import annotations`: FastAPI reads these annotations at run time.)"""

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.templating import Jinja2Templates
from sqlalchemy.engine import Engine
from sqlmodel import Session

from db import reviews
from db.models import AppUser
from integrations.ports import ObjectStore
from review.auth import Tokens, csrf_ok, new_csrf_token
from review.config import ReviewConfig


@dataclass(frozen=True)
class ReviewState:
    """What the routes work with, built once per app by `create_app`."""

    config: ReviewConfig
    engine: Engine
    store: ObjectStore
    templates: Jinja2Templates
    tokens: Tokens
    policy: reviews.LoginPolicy
    texts: Mapping[str, str]  # question id -> question text
    docs_assets: Mapping[str, str]  # Swagger UI file name -> its subresource integrity hash (api_docs only)


class LoginRequired(Exception):
    """A page asked for without a live session: answered with the login page (see `create_app`)."""


# --- state, configuration, database ------------------------------------------------------------------


def get_state(request: Request) -> ReviewState:
    state = getattr(request.app.state, "review", None)
    if not isinstance(state, ReviewState):
        raise RuntimeError("app.state.review is not set: build the app with review.app.create_app")
    return state


StateDep = Annotated[ReviewState, Depends(get_state)]


def get_config(state: StateDep) -> ReviewConfig:
    return state.config


ConfigDep = Annotated[ReviewConfig, Depends(get_config)]


def get_db(state: StateDep) -> Iterator[Session]:
    """One database session per request (the routes commit what they change; the rest rolls back)."""
    with Session(state.engine) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_db)]


# --- request helpers -----------------------------------------------------------------------------------


def client_of(request: Request) -> str | None:
    """The client address (never X-Forwarded-For: see docs/review-security.md)."""
    return request.client.host if request.client else None


def csrf_token(request: Request) -> str:
    """This browser session's CSRF token (made on first use)."""
    token = request.session.get("csrf")
    if not token:
        token = request.session["csrf"] = new_csrf_token()
    return str(token)


# --- who is asking -------------------------------------------------------------------------------------


def _session_user(request: Request, session: Session, config: ReviewConfig) -> AppUser | None:
    key = request.session.get("sid")
    if not isinstance(key, str):
        return None
    return reviews.user_of_session(session=session, key=key, now=config.clock())


def page_user(request: Request, session: SessionDep, config: ConfigDep) -> AppUser:
    """The signed-in user of a page, else `LoginRequired` (a redirect to /login)."""
    user = _session_user(request, session, config)
    if user is None:
        raise LoginRequired
    return user


PageUser = Annotated[AppUser, Depends(page_user)]


@dataclass(frozen=True)
class ApiCaller:
    user: AppUser
    via_token: bool  # a bearer token (no CSRF check needed), else the page's session cookie


def api_caller(request: Request, session: SessionDep, state: StateDep) -> ApiCaller:
    """The user of an API request: a bearer token from POST /api/token, else a session cookie; 401."""
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        claims = state.tokens.read(header[7:].strip())
        user = session.get(AppUser, claims[0]) if claims is not None else None
        if user is None or claims is None or user.disabled or user.auth_version != claims[1]:
            raise HTTPException(401, "invalid or expired token", headers={"WWW-Authenticate": "Bearer"})
        return ApiCaller(user=user, via_token=True)
    user = _session_user(request, session, state.config)
    if user is None:
        raise HTTPException(401, "not authenticated", headers={"WWW-Authenticate": "Bearer"})
    return ApiCaller(user=user, via_token=False)


ApiCallerDep = Annotated[ApiCaller, Depends(api_caller)]


def api_user(caller: ApiCallerDep) -> AppUser:
    return caller.user


ApiUser = Annotated[AppUser, Depends(api_user)]


# --- CSRF and roles ------------------------------------------------------------------------------------


async def check_form_csrf(request: Request) -> None:
    """A form (or HTMX) post carries this session's CSRF token: field `csrf_token` or `X-CSRF-Token`; 403."""
    form = await request.form()
    given = form.get("csrf_token") or request.headers.get("x-csrf-token")
    if not csrf_ok(request.session.get("csrf"), str(given) if given else None):
        raise HTTPException(403, "missing or wrong CSRF token: reload the page")


def page_decider(user: PageUser) -> AppUser:
    """The signed-in user of a page, who may decide on findings (else `reviews.NotAllowed`: 403)."""
    reviews.check_may_decide(user)
    return user


PageDecider = Annotated[AppUser, Depends(page_decider)]


def api_decider(request: Request, caller: ApiCallerDep) -> AppUser:
    """The user of an API write, who may decide on findings. With a session cookie (not a token) the
    write needs the `X-CSRF-Token` header (403)."""
    if not caller.via_token and not csrf_ok(request.session.get("csrf"), request.headers.get("x-csrf-token")):
        raise HTTPException(403, "a cookie-authenticated write needs the X-CSRF-Token header")
    reviews.check_may_decide(caller.user)
    return caller.user


ApiDecider = Annotated[AppUser, Depends(api_decider)]
