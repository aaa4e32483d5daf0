"""The QA review page and its JSON API (FastAPI + Jinja2 + HTMX): the app factory.

`create_app` builds the app's state (`review.deps.ReviewState` on `app.state.review`), its middleware
(server-side sessions named by a signed cookie, security headers), static files and error handlers, and
includes the routers: `review.routes.pages` (HTML) and `review.routes.api` (JSON under /api).

Every page but /login needs a signed-in user; every /api route but /api/token needs a session cookie or a
bearer token from POST /api/token, else 401. Logging out, a password change or reset and disabling a
user end sessions in the database, so a copied cookie stops working at once. Logins are throttled per
user name and per client address and audited. Forms and cookie-authenticated API writes carry a CSRF
token (form field `csrf_token` or header `X-CSRF-Token`). Viewers read; reviewers and admins decide.
URLs carry database ids, never DICOM UIDs; patient identifiers are shown only when
`review.show_patient_identifiers` is on. Every response carries a Content-Security-Policy without inline
script, frame and sniffing protection (docs/review-security.md)."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy.engine import Engine
from starlette.datastructures import MutableHeaders
from starlette.middleware.sessions import SessionMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from db import reviews
from integrations.ports import ObjectStore
from review.auth import Tokens
from review.config import ReviewConfig
from review.deps import LoginRequired, ReviewState
from review.routes import api, pages

__all__ = ["CONTENT_SECURITY_POLICY", "SECURITY_HEADERS", "ReviewConfig", "create_app", "fmt_date"]

HERE = Path(__file__).parent
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
# the HTTP status of each kind of refusal from db.reviews (the most specific class listed wins)
STATUS_OF_REFUSAL: dict[type[reviews.ReviewError], int] = {
    reviews.NotAllowed: 403,
    reviews.NotFound: 404,
    reviews.UserExists: 409,
    reviews.InvalidDecision: 422,
    reviews.InvalidUserChange: 422,
    reviews.ReviewError: 422,
}


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


def _docs_assets(config: ReviewConfig) -> dict[str, str]:
    """Swagger UI's files from `api_docs_assets` with their integrity hashes (api_docs only; never a CDN)."""
    if not config.api_docs:
        return {}
    folder = config.api_docs_assets
    missing = [n for n in SWAGGER_ASSETS if folder is None or not (folder / n).is_file()]
    if folder is None or missing:
        raise ValueError(
            f"review.api_docs needs review.api_docs_assets: a local folder with swagger-ui-dist's "
            f"{' and '.join(SWAGGER_ASSETS)} (missing: {', '.join(missing)}); the docs never load from a CDN"
        )
    return {n: _sri(folder / n) for n in SWAGGER_ASSETS}


# --- error handlers ------------------------------------------------------------------------------------


async def _to_login(request: Request, exc: Exception) -> Response:
    """A page without a live session: the login page (HTMX: a 401 that makes htmx go there)."""
    if request.headers.get("hx-request"):
        return Response(status_code=401, headers={"HX-Redirect": "/login"})
    return RedirectResponse("/login", status_code=303)


async def _bad_parameter(request: Request, exc: Exception) -> Response:
    """A bad query or path parameter is a 400 naming the parameter; a bad body stays FastAPI's 422."""
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    if errors and all(e.get("loc", ("",))[0] in ("query", "path") for e in errors):
        problems = "; ".join(f"{e['loc'][-1]}: {e['msg']}" for e in errors)
        return JSONResponse({"detail": f"bad request parameter: {problems}"}, status_code=400)
    return await request_validation_exception_handler(request, exc)


async def _refused(request: Request, exc: Exception) -> Response:
    """A refusal of db.reviews (pages and API alike): its status by kind, its message as the detail."""
    assert isinstance(exc, reviews.ReviewError)
    status = next(code for kind, code in STATUS_OF_REFUSAL.items() if isinstance(exc, kind))
    return JSONResponse({"detail": str(exc)}, status_code=status)


# --- the app ---------------------------------------------------------------------------------------------


def create_app(*, engine: Engine, store: ObjectStore, config: ReviewConfig) -> FastAPI:
    """The review app over `engine` (migrated to head) and `store` (the rendered images)."""
    docs_assets = _docs_assets(config)
    app = FastAPI(
        title="nightread review",
        description="Review of nightread's AI findings. Authenticate with a session cookie (the web page) "
        "or a bearer token from `POST /api/token` (form fields `username`, `password`).",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.filters["date"] = fmt_date
    app.state.review = ReviewState(
        config=config,
        engine=engine,
        store=store,
        templates=templates,
        tokens=Tokens(config.secret, config.token_ttl_s),
        policy=config.login_policy(),
        texts=dict(config.question_texts or {}),
        docs_assets=docs_assets,
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
    if config.api_docs and config.api_docs_assets is not None:
        app.mount("/docs-assets", StaticFiles(directory=config.api_docs_assets), name="docs-assets")
    app.add_exception_handler(LoginRequired, _to_login)
    app.add_exception_handler(RequestValidationError, _bad_parameter)
    app.add_exception_handler(reviews.ReviewError, _refused)
    app.include_router(pages.router)
    app.include_router(api.router)
    app.include_router(api.service_router)
    if config.api_docs:
        app.include_router(pages.docs_router)
    return app


def fmt_date(value: str | None) -> str:
    """YYYYMMDD as YYYY-MM-DD (the templates' `date` filter)."""
    if not value or len(value) != 8:
        return value or ""
    return f"{value[:4]}-{value[4:6]}-{value[6:]}"
