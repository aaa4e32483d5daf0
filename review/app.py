"""The QA review page and its JSON API (FastAPI + Jinja2 + HTMX).

Every page but /login needs a signed-in user (a server-side session named by the signed cookie); every
/api route but /api/token needs a session cookie or a bearer token from POST /api/token, else 401.
Logging out, a password change or reset and disabling a user end sessions in the database, so a copied
cookie stops working at once. Logins are throttled per user name and per client address and audited.
Forms and cookie-authenticated API writes carry a CSRF token (form field `csrf_token` or header
`X-CSRF-Token`). Viewers read; reviewers and admins decide. URLs carry database ids, never DICOM UIDs;
patient identifiers are shown only when `review.show_patient_identifiers` is on. Every response carries
a Content-Security-Policy without inline script, frame and sniffing protection (docs/review-security.md).

(No `from __future__ import annotations` here: FastAPI reads the route annotations, which name
dependencies defined inside `create_app`.)"""

import base64
import datetime as dt
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qsl, urlencode

from fastapi import Depends, FastAPI, Form, HTTPException, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select
from starlette.datastructures import MutableHeaders
from starlette.middleware.sessions import SessionMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from db import reviews
from db.cohort import MAX_ID, CohortSyntaxError, run_cohort
from db.models import (
    AppUser,
    AuditAction,
    Caption,
    Decision,
    Finding,
    Image,
    ModelVersion,
    Role,
    Study,
    StudyIdentity,
    utcnow,
)
from integrations.ports import ObjectStore
from review.auth import Tokens, check_login, csrf_ok, hash_password, new_csrf_token

HERE = Path(__file__).parent
QUEUE_PARAMS = ("order", "modality", "question", "date_from", "date_to", "model_version", "state", "flagged_only")
MAX_PAGE = 100_000
MAX_PAGE_SIZE = 500
SWAGGER_ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css")
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; font-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}


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

    def login_policy(self) -> reviews.LoginPolicy:
        return reviews.LoginPolicy(
            max_failures_per_user=self.login_max_failures,
            max_failures_per_address=self.login_max_failures_per_address,
            window_s=self.login_window_s,
            lockout_s=self.login_lockout_s,
        )


class DecisionIn(BaseModel):
    decision: str = Field(description="confirm | reject | correct | comment")
    to_answer: str | None = Field(default=None, description="correct: the right answer (closed: yes or no)")
    comment: str | None = None


class _Unauthenticated(Exception):
    pass


class SecurityHeaders:
    """Adds the security headers to every response (pages, API, static files, errors); HSTS only over
    https; `Cache-Control: no-store` on everything but static files unless a route chose otherwise."""

    def __init__(self, app: ASGIApp, *, hsts_max_age_s: int) -> None:
        self.app = app
        self.hsts = f"max-age={hsts_max_age_s}; includeSubDomains"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        https = scope.get("scheme") == "https"
        static = str(scope.get("path", "")).startswith(("/static/", "/docs-assets/"))

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
                if https:
                    headers["Strict-Transport-Security"] = self.hsts
                if not static and "cache-control" not in headers:
                    headers["Cache-Control"] = "no-store"
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _sri(path: Path) -> str:
    return "sha384-" + base64.b64encode(hashlib.sha384(path.read_bytes()).digest()).decode()


def _queue_filter(params: Mapping[str, str]) -> tuple[reviews.QueueFilter, reviews.Order]:
    state = params.get("state") or "pending"
    if state not in ("pending", "confirmed", "rejected", "corrected", "any"):
        raise HTTPException(400, f"unknown review state {state!r}: use pending, confirmed, rejected, corrected or any")
    order = params.get("order") or "critical"
    if order not in ("critical", "uncertain"):
        raise HTTPException(400, f"unknown order {order!r}: use critical or uncertain")
    mv = params.get("model_version") or None
    for key in ("date_from", "date_to"):
        value = params.get(key) or ""
        if value and not (len(value.replace("-", "")) == 8 and value.replace("-", "").isdigit()):
            raise HTTPException(400, f"{key} is a date YYYY-MM-DD")
    try:
        mv_id = int(mv) if mv else None
    except ValueError:
        raise HTTPException(400, "model_version is a whole number") from None
    if mv_id is not None and not 1 <= mv_id <= MAX_ID:
        raise HTTPException(400, f"model_version is between 1 and {MAX_ID}")
    flt = reviews.QueueFilter(
        modality=params.get("modality") or None,
        question_id=params.get("question") or None,
        date_from=(params.get("date_from") or "").replace("-", "") or None,
        date_to=(params.get("date_to") or "").replace("-", "") or None,
        model_version_id=mv_id,
        state=state,  # type: ignore[arg-type]
        flagged_only=(params.get("flagged_only") or "") in ("1", "true", "on"),
    )
    return flt, order  # type: ignore[return-value]


def _queue_query_string(params: Mapping[str, str]) -> str:
    return urlencode({k: params[k] for k in QUEUE_PARAMS if params.get(k)})


def create_app(*, engine: Engine, store: ObjectStore, config: ReviewConfig) -> FastAPI:
    docs_assets: dict[str, str] = {}
    if config.api_docs:
        folder = config.api_docs_assets
        missing = [n for n in SWAGGER_ASSETS if folder is None or not (folder / n).is_file()]
        if missing:
            raise ValueError(
                f"review.api_docs needs review.api_docs_assets: a local folder with swagger-ui-dist's "
                f"{' and '.join(SWAGGER_ASSETS)} (missing: {', '.join(missing)}); the docs never load from a CDN"
            )
        assert folder is not None
        docs_assets = {n: _sri(folder / n) for n in SWAGGER_ASSETS}
    app = FastAPI(
        title="nightread review",
        description="Review of nightread's AI findings. Authenticate with a session cookie (the web page) "
        "or a bearer token from `POST /api/token` (form fields `username`, `password`).",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.add_middleware(
        SessionMiddleware,
        secret_key=config.secret,
        session_cookie="nightread_session",
        max_age=config.session_max_age_s,
        same_site="strict",
        https_only=config.secure_cookies,
    )
    app.add_middleware(SecurityHeaders, hsts_max_age_s=config.hsts_max_age_s)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    if config.api_docs_assets is not None and config.api_docs:
        app.mount("/docs-assets", StaticFiles(directory=config.api_docs_assets), name="docs-assets")
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.filters["date"] = fmt_date
    tokens = Tokens(config.secret, config.token_ttl_s)
    texts = dict(config.question_texts or {})
    policy = config.login_policy()

    # --- dependencies -------------------------------------------------------------------------------
    def db() -> Any:
        with Session(engine) as session:
            yield session

    def csrf_token(request: Request) -> str:
        token = request.session.get("csrf")
        if not token:
            token = request.session["csrf"] = new_csrf_token()
        return str(token)

    def client_of(request: Request) -> str | None:
        return request.client.host if request.client else None

    def session_user(request: Request, session: Session) -> AppUser | None:
        key = request.session.get("sid")
        if not isinstance(key, str):
            return None
        return reviews.user_of_session(session=session, key=key, now=config.clock())

    def page_user(request: Request, session: Annotated[Session, Depends(db)]) -> AppUser:
        user = session_user(request, session)
        if user is None:
            raise _Unauthenticated
        return user

    def api_user(request: Request, session: Annotated[Session, Depends(db)]) -> AppUser:
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            claims = tokens.read(header[7:].strip())
            user = session.get(AppUser, claims[0]) if claims is not None else None
            if user is None or claims is None or user.disabled or user.auth_version != claims[1]:
                raise HTTPException(401, "invalid or expired token", headers={"WWW-Authenticate": "Bearer"})
            request.state.via_token = True
            return user
        user = session_user(request, session)
        if user is None:
            raise HTTPException(401, "not authenticated", headers={"WWW-Authenticate": "Bearer"})
        request.state.via_token = False
        return user

    async def check_form_csrf(request: Request) -> None:
        form = await request.form()
        given = form.get("csrf_token") or request.headers.get("x-csrf-token")
        if not csrf_ok(request.session.get("csrf"), str(given) if given else None):
            raise HTTPException(403, "missing or wrong CSRF token: reload the page")

    @app.exception_handler(_Unauthenticated)
    async def _to_login(request: Request, exc: _Unauthenticated) -> Response:
        if request.headers.get("hx-request"):
            return Response(status_code=401, headers={"HX-Redirect": "/login"})
        return RedirectResponse("/login", status_code=303)

    @app.exception_handler(RequestValidationError)
    async def _bad_parameter(request: Request, exc: RequestValidationError) -> Response:
        """A bad query or path parameter is a 400 naming the parameter; a bad body stays FastAPI's 422."""
        errors = exc.errors()
        if errors and all(e.get("loc", ("",))[0] in ("query", "path") for e in errors):
            problems = "; ".join(f"{e['loc'][-1]}: {e['msg']}" for e in errors)
            return JSONResponse({"detail": f"bad request parameter: {problems}"}, status_code=400)
        return await request_validation_exception_handler(request, exc)

    def render(request: Request, name: str, user: AppUser | None, **ctx: Any) -> HTMLResponse:
        return templates.TemplateResponse(
            request,
            name,
            {"user": user, "csrf": csrf_token(request), "can_decide": user is not None and user.role in Role.DECIDE}
            | ctx,
        )

    def begin_session(request: Request, session: Session, user: AppUser) -> None:
        """A fresh server-side session for this browser (the old cookie's content is dropped)."""
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

    # --- login / logout / password ----------------------------------------------------------------
    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_page(request: Request) -> HTMLResponse:
        return render(request, "login.html", None, error=None)

    @app.post("/login", include_in_schema=False, dependencies=[Depends(check_form_csrf)])
    def login(
        request: Request,
        session: Annotated[Session, Depends(db)],
        username: Annotated[str, Form()],
        password: Annotated[str, Form()],
    ) -> Response:
        result = check_login(
            session=session,
            username=username,
            password=password,
            client=client_of(request),
            policy=policy,
            secret=config.secret,
            now=config.clock(),
            purpose="page",
        )
        session.commit()
        if result.user is None:
            response = render(request, "login.html", None, error=result.message)
            response.status_code = result.status
            if result.retry_after_s is not None:
                response.headers["Retry-After"] = str(result.retry_after_s)
            return response
        begin_session(request, session, result.user)
        return RedirectResponse("/", status_code=303)

    @app.post("/logout", include_in_schema=False, dependencies=[Depends(check_form_csrf)])
    def logout(request: Request, session: Annotated[Session, Depends(db)]) -> Response:
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

    @app.get("/password", response_class=HTMLResponse, include_in_schema=False)
    def password_page(request: Request, user: Annotated[AppUser, Depends(page_user)]) -> HTMLResponse:
        return render(request, "password.html", user, error=None, done=False)

    @app.post("/password", include_in_schema=False, dependencies=[Depends(check_form_csrf)])
    def change_password(
        request: Request,
        session: Annotated[Session, Depends(db)],
        user: Annotated[AppUser, Depends(page_user)],
        current: Annotated[str, Form()],
        new: Annotated[str, Form()],
        repeat: Annotated[str, Form()],
    ) -> Response:
        """The user's own password: the current one is checked like a login (throttled, audited); every
        session of the user ends and their API tokens stop working; this browser gets a new session."""

        def refuse(status: int, message: str, retry_after_s: int | None = None) -> HTMLResponse:
            response = render(request, "password.html", user, error=message, done=False)
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
            policy=policy,
            secret=config.secret,
            now=config.clock(),
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
            now=config.clock(),
        )
        begin_session(request, session, changed)
        return render(request, "password.html", changed, error=None, done=True)

    # --- the queue -----------------------------------------------------------------------------------
    def queue_data(session: Session, params: Mapping[str, str], page: int, size: int | None = None) -> dict[str, Any]:
        flt, order = _queue_filter(params)
        size = size or config.page_size
        items, total = reviews.queue(
            session=session,
            flt=flt,
            order=order,
            critical_ids=config.critical_ids,
            offset=(page - 1) * size,
            limit=size,
        )
        return {
            "items": items,
            "total": total,
            "page": page,
            "pages": max(1, -(-total // size)),
            "counts": reviews.queue_counts(session=session),
            "order": order,
            "flt": flt,
        }

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def queue_page(
        request: Request,
        session: Annotated[Session, Depends(db)],
        user: Annotated[AppUser, Depends(page_user)],
        page: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 1,
    ) -> HTMLResponse:
        params = dict(request.query_params)
        data = queue_data(session, params, page)
        versions = session.exec(select(ModelVersion).order_by(col(ModelVersion.id))).all()
        modalities = sorted(set(session.exec(select(Image.modality).distinct()).all()))
        return render(
            request,
            "queue.html",
            user,
            **data,
            params=params,
            qs=_queue_query_string(params),
            texts=texts,
            versions=versions,
            modalities=modalities,
            questions=sorted(texts),
        )

    # --- a study -------------------------------------------------------------------------------------
    def study_data(session: Session, study_id: int) -> dict[str, Any]:
        study = session.get(Study, study_id)
        if study is None:
            raise HTTPException(404, f"no study {study_id}")
        images = session.exec(select(Image).where(Image.study_id == study_id).order_by(col(Image.id))).all()
        image_ids = [i.id for i in images]
        captions = session.exec(select(Caption).where(col(Caption.image_id).in_(image_ids))).all()
        findings = session.exec(
            select(Finding).where(Finding.study_id == study_id).order_by(col(Finding.image_id), col(Finding.id))
        ).all()
        states = reviews.finding_states(session=session, finding_ids=[f.id for f in findings if f.id is not None])
        identity = session.get(StudyIdentity, study_id) if config.show_patient_identifiers else None
        by_image: dict[int, dict[str, Any]] = {
            i.id: {"image": i, "captions": [], "findings": []} for i in images if i.id is not None
        }
        for c in captions:
            by_image[c.image_id]["captions"].append(c)
        for f in findings:
            by_image[f.image_id]["findings"].append(f)
        return {
            "study": study,
            "images": [v for v in by_image.values() if v["captions"] or v["findings"]],
            "states": states,
            "identity": identity,
            "history": reviews.history(session=session, finding_ids=[f.id for f in findings if f.id is not None]),
        }

    def queue_url(qs: str) -> str:
        return "/" + (f"?{qs}" if qs else "")

    def study_url(session: Session, finding_id: int | None, qs: str) -> str:
        """The study view focused on a finding, or the queue when there is none."""
        finding = session.get(Finding, finding_id) if finding_id is not None else None
        if finding is None:
            return queue_url(qs)
        return f"/studies/{finding.study_id}?finding={finding.id}" + (f"&{qs}" if qs else "")

    def ordered_ids(session: Session, params: Mapping[str, str]) -> list[int]:
        flt, order = _queue_filter(params)
        return reviews.queue_ids(session=session, flt=flt, order=order, critical_ids=config.critical_ids)

    def next_url(session: Session, params: Mapping[str, str], after: int | None) -> str:
        """Where `n` goes from the finding `after`: the next one in the queue."""
        qs = _queue_query_string(params)
        if after is None:
            return queue_url(qs)
        return study_url(session, reviews.next_after(ordered_ids(session, params), after), qs)

    @app.get("/studies/{study_id}", response_class=HTMLResponse, include_in_schema=False)
    def study_page(
        request: Request,
        study_id: Annotated[int, PathParam(ge=1, le=MAX_ID)],
        session: Annotated[Session, Depends(db)],
        user: Annotated[AppUser, Depends(page_user)],
        finding: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    ) -> HTMLResponse:
        params = dict(request.query_params)
        _queue_filter(params)  # validate
        name = "_study.html" if request.headers.get("hx-request") else "study.html"
        return render(
            request,
            name,
            user,
            **study_data(session, study_id),
            current=finding,
            qs=_queue_query_string(params),
            texts=texts,
            next_url=next_url(session, params, finding),
        )

    @app.get("/images/{image_id}", include_in_schema=False)
    def image_png(
        image_id: Annotated[int, PathParam(ge=1, le=MAX_ID)],
        session: Annotated[Session, Depends(db)],
        user: Annotated[AppUser, Depends(page_user)],
    ) -> Response:
        image = session.get(Image, image_id)
        if image is None:
            raise HTTPException(404, f"no image {image_id}")
        return Response(store.get(image.object_key), media_type="image/png", headers={"Cache-Control": "private"})

    @app.post("/findings/{finding_id}/decision", include_in_schema=False, dependencies=[Depends(check_form_csrf)])
    def decide_form(
        request: Request,
        finding_id: Annotated[int, PathParam(ge=1, le=MAX_ID)],
        session: Annotated[Session, Depends(db)],
        user: Annotated[AppUser, Depends(page_user)],
        decision: Annotated[str, Form()],
        to_answer: Annotated[str | None, Form()] = None,
        comment: Annotated[str | None, Form()] = None,
        queue: Annotated[str, Form()] = "",
    ) -> Response:
        params = dict(parse_qsl(queue))
        _queue_filter(params)  # validate before deciding
        try:
            reviews.decide(
                session=session,
                user=user,
                finding_id=finding_id,
                decision=decision,
                to_answer=to_answer,
                comment=comment,
            )
            session.commit()
        except PermissionError as exc:
            raise HTTPException(403, str(exc)) from None
        except reviews.ReviewError as exc:
            raise HTTPException(422, str(exc)) from None
        ids = ordered_ids(session, params)  # the queue after this decision
        next_id = finding_id if decision == Decision.COMMENT else reviews.next_after(ids, finding_id)
        qs = _queue_query_string(params)
        url = study_url(session, next_id, qs)
        if not request.headers.get("hx-request"):
            return RedirectResponse(url, status_code=303)
        if next_id is None:
            response = render(request, "_done.html", user, qs=qs)
        else:
            nxt = session.get(Finding, next_id)
            assert nxt is not None
            response = render(
                request,
                "_study.html",
                user,
                **study_data(session, nxt.study_id),
                current=next_id,
                qs=qs,
                texts=texts,
                next_url=study_url(session, reviews.next_after(ids, next_id), qs),
            )
        response.headers["HX-Push-Url"] = url
        return response

    # --- the API -------------------------------------------------------------------------------------
    @app.post(
        "/api/token",
        tags=["auth"],
        summary="A bearer token for the API",
        description="Throttled like the login page: too many failures lock the user name or the client "
        "address (429 with Retry-After). A password change or reset revokes the user's tokens.",
    )
    def api_token(
        request: Request,
        session: Annotated[Session, Depends(db)],
        username: Annotated[str, Form()],
        password: Annotated[str, Form()],
    ) -> dict[str, Any]:
        result = check_login(
            session=session,
            username=username,
            password=password,
            client=client_of(request),
            policy=policy,
            secret=config.secret,
            now=config.clock(),
            purpose="api",
        )
        session.commit()
        if result.user is None:
            headers = {"WWW-Authenticate": "Bearer"}
            if result.retry_after_s is not None:
                headers["Retry-After"] = str(result.retry_after_s)
            message = "wrong user name or password" if result.status == 401 else result.message
            raise HTTPException(result.status, message, headers=headers)
        return {"access_token": tokens.issue(result.user), "token_type": "bearer", "expires_in": tokens.ttl_s}

    @app.get("/api/queue", tags=["review"], summary="The flag queue, filtered and ordered like the page")
    def api_queue(
        request: Request,
        session: Annotated[Session, Depends(db)],
        user: Annotated[AppUser, Depends(api_user)],
        page: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 1,
        page_size: Annotated[
            int | None, Query(ge=1, le=MAX_PAGE_SIZE, description="findings per page (default: the page's)")
        ] = None,
        order: Annotated[str, Query(description="critical | uncertain")] = "critical",
        state: Annotated[str, Query(description="pending | confirmed | rejected | corrected | any")] = "pending",
        modality: str | None = None,
        question: str | None = None,
        date_from: Annotated[str | None, Query(description="YYYY-MM-DD")] = None,
        date_to: Annotated[str | None, Query(description="YYYY-MM-DD")] = None,
        model_version: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
        flagged_only: bool = False,
    ) -> dict[str, Any]:
        data = queue_data(session, {k: str(v) for k, v in request.query_params.items()}, page, page_size)
        return {
            "items": [asdict(i) for i in data["items"]],
            "total": data["total"],
            "page": data["page"],
            "pages": data["pages"],
            "counts": data["counts"],
        }

    @app.get("/api/studies/{study_id}", tags=["review"], summary="A study's images, captions and findings")
    def api_study(
        study_id: Annotated[int, PathParam(ge=1, le=MAX_ID)],
        session: Annotated[Session, Depends(db)],
        user: Annotated[AppUser, Depends(api_user)],
    ) -> dict[str, Any]:
        data = study_data(session, study_id)
        study: Study = data["study"]
        out: dict[str, Any] = {
            "id": study.id,
            "study_date": study.study_date,
            "modalities": study.modalities,
            "status": study.status,
            "images": [],
        }
        if data["identity"] is not None:
            ident: StudyIdentity = data["identity"]
            out["patient"] = {
                "name": ident.patient_name,
                "id": ident.patient_id,
                "accession_number": ident.accession_number,
            }
        for entry in data["images"]:
            image: Image = entry["image"]
            out["images"].append(
                {
                    "id": image.id,
                    "url": f"/images/{image.id}",
                    "modality": image.modality,
                    "view": image.view,
                    "ct_window": image.ct_window,
                    "render_version": image.render_version,
                    "captions": [{"model_version_id": c.model_version_id, "text": c.text} for c in entry["captions"]],
                    "findings": [
                        {
                            "id": f.id,
                            "question_id": f.question_id,
                            "question": texts.get(f.question_id, f.question_id),
                            "kind": f.kind,
                            "answer": f.answer,
                            "probability": f.probability,
                            "flagged": f.flagged,
                            "model_version_id": f.model_version_id,
                            "bank_version": f.bank_version,
                            "review_state": data["states"][f.id][0],
                            "corrected_answer": data["states"][f.id][1],
                        }
                        for f in entry["findings"]
                    ],
                }
            )
        return out

    @app.post("/api/findings/{finding_id}/decision", tags=["review"], status_code=201, summary="Decide on a finding")
    def api_decide(
        request: Request,
        finding_id: Annotated[int, PathParam(ge=1, le=MAX_ID)],
        body: DecisionIn,
        session: Annotated[Session, Depends(db)],
        user: Annotated[AppUser, Depends(api_user)],
    ) -> dict[str, Any]:
        if not request.state.via_token and not csrf_ok(
            request.session.get("csrf"), request.headers.get("x-csrf-token")
        ):
            raise HTTPException(403, "a cookie-authenticated write needs the X-CSRF-Token header")
        try:
            row = reviews.decide(
                session=session,
                user=user,
                finding_id=finding_id,
                decision=body.decision,
                to_answer=body.to_answer,
                comment=body.comment,
            )
            session.commit()
        except PermissionError as exc:
            raise HTTPException(403, str(exc)) from None
        except reviews.ReviewError as exc:
            raise HTTPException(422, str(exc)) from None
        state = reviews.finding_states(session=session, finding_ids=[finding_id])[finding_id]
        return {"review_id": row.id, "finding_id": finding_id, "review_state": state[0], "corrected_answer": state[1]}

    @app.get("/api/cohort", tags=["cohorts"], summary="Studies or images matching a cohort expression")
    def api_cohort(
        request: Request,
        session: Annotated[Session, Depends(db)],
        user: Annotated[AppUser, Depends(api_user)],
        where: Annotated[
            str, Query(description="e.g. pleural_effusion >= 0.8 and not pneumothorax (at most 2000 characters)")
        ] = "",
        per: Annotated[str, Query(description="study | image")] = "study",
        model_version: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
        limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
    ) -> dict[str, Any]:
        if per not in ("study", "image"):
            raise HTTPException(400, "per is study or image")
        try:
            result = run_cohort(
                session=session,
                where=where,
                unit=per,  # type: ignore[arg-type]
                model_version_id=model_version,
                known_questions=list(texts),
                limit=limit,
            )
        except CohortSyntaxError as exc:
            raise HTTPException(400, f"cohort expression: {exc}") from None
        rows = [{k: v for k, v in r.items() if k != "object_key"} for r in result.rows]
        reviews.audit(
            session=session,
            action=AuditAction.COHORT_EXPORTED,
            actor=user.name,
            client=client_of(request),
            detail=f"GET /api/cohort: {len(rows)} {per} row(s); where: {where[:400]}",
            now=config.clock(),
        )
        session.commit()
        for r in rows:
            if "image_id" in r:
                r["url"] = f"/images/{r['image_id']}"
        return {
            "where": where,
            "per": per,
            "count": len(rows),
            "rows": rows,
            "model_version_ids": result.model_version_ids,
            "question_bank_versions": result.bank_versions,
        }

    # --- OpenAPI, behind a login like every page; Swagger UI only when enabled, from local files ------
    @app.get("/openapi.json", include_in_schema=False)
    def openapi(user: Annotated[AppUser, Depends(api_user)]) -> JSONResponse:
        return JSONResponse(app.openapi())

    if config.api_docs:

        @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
        def docs(request: Request, user: Annotated[AppUser, Depends(page_user)]) -> HTMLResponse:
            return render(request, "docs.html", user, integrity=docs_assets)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def fmt_date(value: str | None) -> str:
    if not value or len(value) != 8:
        return value or ""
    return f"{value[:4]}-{value[4:6]}-{value[6:]}"
