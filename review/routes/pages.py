"""The HTML pages (Jinja2 + HTMX): login, logout and the password form; the queue; a study with its
decision forms; the images; Swagger UI at /docs (`docs_router`, included only with `api_docs`). Every
page but /login needs a signed-in user; every form carries the session's CSRF token.

(No `from __future__ import annotations`: FastAPI reads these annotations at run time.)"""

from collections.abc import Mapping
from typing import Annotated, Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, BackgroundTasks, Depends, Form, HTTPException, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, RedirectResponse
from sqlmodel import Session, col, select

from db import reviews
from db.cohort import MAX_ID
from db.models import AppUser, AuditAction, Decision, Finding, Image, ModelVersion
from review.auth import check_login, hash_password, new_csrf_token
from review.deps import (
    ConfigDep,
    PageDecider,
    PageUser,
    SessionDep,
    StateDep,
    check_form_csrf,
    client_of,
    csrf_token,
    get_state,
)
from review.hooks import after_decision
from review.views import MAX_PAGE, queue_filter, queue_query_string, queue_view, study_view

router = APIRouter(include_in_schema=False)
docs_router = APIRouter(include_in_schema=False)

FindingId = Annotated[int, PathParam(ge=1, le=MAX_ID)]


def _render(request: Request, name: str, user: AppUser | None, **ctx: Any) -> HTMLResponse:
    """A template with the user, the CSRF token and whether the user may decide."""
    can_decide = user is not None and reviews.may_decide(user)
    return get_state(request).templates.TemplateResponse(
        request, name, {"user": user, "csrf": csrf_token(request), "can_decide": can_decide} | ctx
    )


def _begin_session(request: Request, session: Session, user: AppUser) -> None:
    """A fresh server-side session for this browser (the old cookie's content is dropped)."""
    config = get_state(request).config
    key = reviews.start_session(
        session=session,
        user=user,
        client=client_of(request),
        max_age_s=config.session_max_age_s,
        now=config.clock(),
    )
    session.commit()
    request.session.clear()
    request.session["sid"] = key
    request.session["csrf"] = new_csrf_token()


# --- login / logout / password ----------------------------------------------------------------------


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request) -> HTMLResponse:
    return _render(request, "login.html", None, error=None)


@router.post("/login", dependencies=[Depends(check_form_csrf)])
def login(
    request: Request,
    session: SessionDep,
    state: StateDep,
    username: Annotated[str, Form()],
    password: Annotated[str, Form()],
) -> Response:
    result = check_login(
        session=session,
        username=username,
        password=password,
        client=client_of(request),
        policy=state.policy,
        secret=state.config.secret,
        now=state.config.clock(),
        purpose="page",
    )
    session.commit()
    if result.user is None:
        response = _render(request, "login.html", None, error=result.message)
        response.status_code = result.status
        if result.retry_after_s is not None:
            response.headers["Retry-After"] = str(result.retry_after_s)
        return response
    _begin_session(request, session, result.user)
    return RedirectResponse("/", status_code=303)


@router.post("/logout", dependencies=[Depends(check_form_csrf)])
def logout(request: Request, session: SessionDep, config: ConfigDep) -> Response:
    key = request.session.get("sid")
    if isinstance(key, str):
        now = config.clock()
        user = reviews.end_session(session=session, key=key, reason="logout", now=now)
        if user is not None:
            reviews.audit(
                session=session, action=AuditAction.LOGOUT, actor=user.name, client=client_of(request), now=now
            )
        session.commit()
    request.session.clear()
    return RedirectResponse("/login", status_code=303)


@router.get("/password", response_class=HTMLResponse)
def password_page(request: Request, user: PageUser) -> HTMLResponse:
    return _render(request, "password.html", user, error=None, done=False)


@router.post("/password", dependencies=[Depends(check_form_csrf)])
def change_password(
    request: Request,
    session: SessionDep,
    state: StateDep,
    user: PageUser,
    current: Annotated[str, Form()],
    new: Annotated[str, Form()],
    repeat: Annotated[str, Form()],
) -> Response:
    """The user's own password: the current one is checked like a login (throttled, audited); every
    session of the user ends and their API tokens stop working; this browser gets a new session."""

    def refuse(status: int, message: str, retry_after_s: int | None = None) -> HTMLResponse:
        response = _render(request, "password.html", user, error=message, done=False)
        response.status_code = status
        if retry_after_s is not None:
            response.headers["Retry-After"] = str(retry_after_s)
        return response

    if new != repeat:
        return refuse(400, "The new password and its repetition differ.")
    try:
        hashed = hash_password(new)
    except ValueError as exc:
        return refuse(400, f"The new password is not accepted: {exc}.")
    result = check_login(
        session=session,
        username=user.name,
        password=current,
        client=client_of(request),
        policy=state.policy,
        secret=state.config.secret,
        now=state.config.clock(),
        purpose="password change",
    )
    if result.user is None:
        session.commit()
        message = "The current password is wrong." if result.status == 401 else result.message
        return refuse(result.status, message, result.retry_after_s)
    changed = reviews.set_password(
        session=session,
        name=user.name,
        password_hash=hashed,
        actor=user.name,
        by_admin=False,
        client=client_of(request),
        now=state.config.clock(),
    )
    _begin_session(request, session, changed)
    return _render(request, "password.html", changed, error=None, done=True)


# --- the queue ---------------------------------------------------------------------------------------


@router.get("/", response_class=HTMLResponse)
def queue_page(
    request: Request,
    session: SessionDep,
    state: StateDep,
    user: PageUser,
    page: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 1,
) -> HTMLResponse:
    params = dict(request.query_params)
    view = queue_view(
        session=session, params=params, page=page, size=state.config.page_size, critical_ids=state.config.critical_ids
    )
    versions = session.exec(select(ModelVersion).order_by(col(ModelVersion.id))).all()
    modalities = sorted(set(session.exec(select(Image.modality).distinct()).all()))
    return _render(
        request,
        "queue.html",
        user,
        **view.context(),
        params=params,
        qs=queue_query_string(params),
        texts=state.texts,
        versions=versions,
        modalities=modalities,
        questions=sorted(state.texts),
    )


# --- a study: where the queue leads ------------------------------------------------------------------


def _queue_url(qs: str) -> str:
    return "/" + (f"?{qs}" if qs else "")


def _study_url(session: Session, finding_id: int | None, qs: str) -> str:
    """The study view focused on a finding, or the queue when there is none."""
    finding = session.get(Finding, finding_id) if finding_id is not None else None
    if finding is None:
        return _queue_url(qs)
    return f"/studies/{finding.study_id}?finding={finding.id}" + (f"&{qs}" if qs else "")


def _ordered_ids(session: Session, params: Mapping[str, str], critical_ids: tuple[str, ...]) -> list[int]:
    flt, order = queue_filter(params)
    return reviews.queue_ids(session=session, flt=flt, order=order, critical_ids=critical_ids)


def _next_url(session: Session, params: Mapping[str, str], after: int | None, critical_ids: tuple[str, ...]) -> str:
    """Where `n` goes from the finding `after`: the next one in the queue."""
    qs = queue_query_string(params)
    if after is None:
        return _queue_url(qs)
    return _study_url(session, reviews.next_after(_ordered_ids(session, params, critical_ids), after), qs)


@router.get("/studies/{study_id}", response_class=HTMLResponse)
def study_page(
    request: Request,
    study_id: Annotated[int, PathParam(ge=1, le=MAX_ID)],
    session: SessionDep,
    state: StateDep,
    user: PageUser,
    finding: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
) -> HTMLResponse:
    config = state.config
    params = dict(request.query_params)
    queue_filter(params)  # validate
    name = "_study.html" if request.headers.get("hx-request") else "study.html"
    view = study_view(session=session, study_id=study_id, show_identifiers=config.show_patient_identifiers)
    return _render(
        request,
        name,
        user,
        **view.context(),
        current=finding,
        qs=queue_query_string(params),
        texts=state.texts,
        next_url=_next_url(session, params, finding, config.critical_ids),
    )


@router.get("/images/{image_id}")
def image_png(
    image_id: Annotated[int, PathParam(ge=1, le=MAX_ID)],
    session: SessionDep,
    state: StateDep,
    user: PageUser,
) -> Response:
    image = session.get(Image, image_id)
    if image is None:
        raise HTTPException(404, f"no image {image_id}")
    return Response(state.store.get(image.object_key), media_type="image/png", headers={"Cache-Control": "private"})


@router.post("/findings/{finding_id}/decision", dependencies=[Depends(check_form_csrf)])
def decide_form(
    request: Request,
    background: BackgroundTasks,
    finding_id: FindingId,
    session: SessionDep,
    state: StateDep,
    user: PageDecider,
    decision: Annotated[str, Form()],
    to_answer: Annotated[str | None, Form()] = None,
    comment: Annotated[str | None, Form()] = None,
    queue: Annotated[str, Form()] = "",
) -> Response:
    """A decision from the study view's form; then the next finding of the queue: a redirect, or with
    HTMX the study fragment in place (and its address for the address bar)."""
    config = state.config
    params = dict(parse_qsl(queue))
    queue_filter(params)  # validate before deciding
    reviews.decide(
        session=session, user=user, finding_id=finding_id, decision=decision, to_answer=to_answer, comment=comment
    )
    session.commit()
    after_decision(background, session=session, config=config, finding_id=finding_id, decision=decision)
    ids = _ordered_ids(session, params, config.critical_ids)  # the queue after this decision
    next_id = finding_id if decision == Decision.COMMENT else reviews.next_after(ids, finding_id)
    qs = queue_query_string(params)
    url = _study_url(session, next_id, qs)
    if not request.headers.get("hx-request"):
        return RedirectResponse(url, status_code=303)
    if next_id is None:
        response = _render(request, "_done.html", user, qs=qs)
    else:
        nxt = session.get(Finding, next_id)
        assert nxt is not None
        view = study_view(session=session, study_id=nxt.study_id, show_identifiers=config.show_patient_identifiers)
        response = _render(
            request,
            "_study.html",
            user,
            **view.context(),
            current=next_id,
            qs=qs,
            texts=state.texts,
            next_url=_study_url(session, reviews.next_after(ids, next_id), qs),
        )
    response.headers["HX-Push-Url"] = url
    return response


# --- Swagger UI, behind a login, from local files only (included with api_docs) ----------------------


@docs_router.get("/docs", response_class=HTMLResponse)
def docs(request: Request, state: StateDep, user: PageUser) -> HTMLResponse:
    return _render(request, "docs.html", user, integrity=state.docs_assets)
