"""The QA review page and its JSON API (FastAPI + Jinja2 + HTMX).

Every page but /login needs a signed-in user (session cookie); every /api route but /api/token
needs a session cookie or a bearer token from POST /api/token, else 401. Forms and cookie-authenticated
API writes carry a CSRF token (form field `csrf_token` or header `X-CSRF-Token`). Viewers read;
reviewers and admins decide. URLs carry database ids, never DICOM UIDs; patient identifiers are shown
only when `review.show_patient_identifiers` is on.

(No `from __future__ import annotations` here: FastAPI reads the route annotations, which name
dependencies defined inside `create_app`.)"""

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import Depends, FastAPI, Form, HTTPException, Query, Request, Response
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select
from starlette.middleware.sessions import SessionMiddleware

from db import reviews
from db.cohort import CohortSyntaxError, run_cohort
from db.models import AppUser, Caption, Decision, Finding, Image, ModelVersion, Role, Study, StudyIdentity
from integrations.ports import ObjectStore
from review.auth import Tokens, csrf_ok, new_csrf_token, verify_password

HERE = Path(__file__).parent
QUEUE_PARAMS = ("order", "modality", "question", "date_from", "date_to", "model_version", "state", "flagged_only")


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


class DecisionIn(BaseModel):
    decision: str = Field(description="confirm | reject | correct | comment")
    to_answer: str | None = Field(default=None, description="correct: the right answer (closed: yes or no)")
    comment: str | None = None


class _Unauthenticated(Exception):
    pass


def _queue_filter(params: Mapping[str, str]) -> tuple[reviews.QueueFilter, reviews.Order]:
    state = params.get("state") or "pending"
    if state not in ("pending", "confirmed", "rejected", "corrected", "any"):
        raise HTTPException(422, f"unknown review state {state!r}")
    order = params.get("order") or "critical"
    if order not in ("critical", "uncertain"):
        raise HTTPException(422, f"unknown order {order!r}: use critical or uncertain")
    mv = params.get("model_version") or None
    for key in ("date_from", "date_to"):
        value = params.get(key) or ""
        if value and not (len(value.replace("-", "")) == 8 and value.replace("-", "").isdigit()):
            raise HTTPException(422, f"{key} is a date YYYY-MM-DD")
    try:
        mv_id = int(mv) if mv else None
    except ValueError:
        raise HTTPException(422, "model_version is a number") from None
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
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.filters["date"] = fmt_date
    tokens = Tokens(config.secret, config.token_ttl_s)
    texts = dict(config.question_texts or {})

    # --- dependencies -------------------------------------------------------------------------------
    def db() -> Any:
        with Session(engine) as session:
            yield session

    def csrf_token(request: Request) -> str:
        token = request.session.get("csrf")
        if not token:
            token = request.session["csrf"] = new_csrf_token()
        return str(token)

    def session_user(request: Request, session: Session) -> AppUser | None:
        uid = request.session.get("uid")
        if not isinstance(uid, int):
            return None
        user = session.get(AppUser, uid)
        return user if user is not None and not user.disabled else None

    def page_user(request: Request, session: Annotated[Session, Depends(db)]) -> AppUser:
        user = session_user(request, session)
        if user is None:
            raise _Unauthenticated
        return user

    def api_user(request: Request, session: Annotated[Session, Depends(db)]) -> AppUser:
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            uid = tokens.read(header[7:].strip())
            user = session.get(AppUser, uid) if uid is not None else None
            if user is None or user.disabled:
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

    def render(request: Request, name: str, user: AppUser | None, **ctx: Any) -> HTMLResponse:
        return templates.TemplateResponse(
            request,
            name,
            {"user": user, "csrf": csrf_token(request), "can_decide": user is not None and user.role in Role.DECIDE}
            | ctx,
        )

    # --- login / logout ---------------------------------------------------------------------------
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
        user = reviews.get_user(session=session, name=username)
        ok = verify_password(password, user.password_hash if user else None)
        if user is None or not ok or user.disabled:
            response = render(request, "login.html", None, error="Wrong user name or password.")
            response.status_code = 401
            return response
        request.session.clear()
        request.session["uid"] = user.id
        request.session["csrf"] = new_csrf_token()
        return RedirectResponse("/", status_code=303)

    @app.post("/logout", include_in_schema=False, dependencies=[Depends(check_form_csrf)])
    def logout(request: Request) -> Response:
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    # --- the queue -----------------------------------------------------------------------------------
    def queue_data(session: Session, params: Mapping[str, str], page: int) -> dict[str, Any]:
        flt, order = _queue_filter(params)
        size = config.page_size
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
        page: Annotated[int, Query(ge=1)] = 1,
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
        study_id: int,
        session: Annotated[Session, Depends(db)],
        user: Annotated[AppUser, Depends(page_user)],
        finding: int | None = None,
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
        image_id: int, session: Annotated[Session, Depends(db)], user: Annotated[AppUser, Depends(page_user)]
    ) -> Response:
        image = session.get(Image, image_id)
        if image is None:
            raise HTTPException(404, f"no image {image_id}")
        return Response(store.get(image.object_key), media_type="image/png", headers={"Cache-Control": "private"})

    @app.post("/findings/{finding_id}/decision", include_in_schema=False, dependencies=[Depends(check_form_csrf)])
    def decide_form(
        request: Request,
        finding_id: int,
        session: Annotated[Session, Depends(db)],
        user: Annotated[AppUser, Depends(page_user)],
        decision: Annotated[str, Form()],
        to_answer: Annotated[str | None, Form()] = None,
        comment: Annotated[str | None, Form()] = None,
        queue: Annotated[str, Form()] = "",
    ) -> Response:
        from urllib.parse import parse_qsl

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
    @app.post("/api/token", tags=["auth"], summary="A bearer token for the API")
    def api_token(
        session: Annotated[Session, Depends(db)],
        username: Annotated[str, Form()],
        password: Annotated[str, Form()],
    ) -> dict[str, Any]:
        user = reviews.get_user(session=session, name=username)
        ok = verify_password(password, user.password_hash if user else None)
        if user is None or not ok or user.disabled or user.id is None:
            raise HTTPException(401, "wrong user name or password", headers={"WWW-Authenticate": "Bearer"})
        return {"access_token": tokens.issue(user.id), "token_type": "bearer", "expires_in": tokens.ttl_s}

    @app.get("/api/queue", tags=["review"], summary="The flag queue, filtered and ordered like the page")
    def api_queue(
        request: Request,
        session: Annotated[Session, Depends(db)],
        user: Annotated[AppUser, Depends(api_user)],
        page: Annotated[int, Query(ge=1)] = 1,
        order: Annotated[str, Query(description="critical | uncertain")] = "critical",
        state: Annotated[str, Query(description="pending | confirmed | rejected | corrected | any")] = "pending",
        modality: str | None = None,
        question: str | None = None,
        date_from: Annotated[str | None, Query(description="YYYY-MM-DD")] = None,
        date_to: Annotated[str | None, Query(description="YYYY-MM-DD")] = None,
        model_version: int | None = None,
        flagged_only: bool = False,
    ) -> dict[str, Any]:
        data = queue_data(session, {k: str(v) for k, v in request.query_params.items()}, page)
        return {
            "items": [asdict(i) for i in data["items"]],
            "total": data["total"],
            "page": data["page"],
            "pages": data["pages"],
            "counts": data["counts"],
        }

    @app.get("/api/studies/{study_id}", tags=["review"], summary="A study's images, captions and findings")
    def api_study(
        study_id: int, session: Annotated[Session, Depends(db)], user: Annotated[AppUser, Depends(api_user)]
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
        finding_id: int,
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
        session: Annotated[Session, Depends(db)],
        user: Annotated[AppUser, Depends(api_user)],
        where: Annotated[str, Query(description="e.g. pleural_effusion >= 0.8 and not pneumothorax")] = "",
        per: Annotated[str, Query(description="study | image")] = "study",
        model_version: int | None = None,
        limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
    ) -> dict[str, Any]:
        if per not in ("study", "image"):
            raise HTTPException(422, "per is study or image")
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
            raise HTTPException(422, f"cohort expression: {exc}") from None
        rows = [{k: v for k, v in r.items() if k != "object_key"} for r in result.rows]
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

    # --- OpenAPI, behind a session like every page -------------------------------------------------
    @app.get("/openapi.json", include_in_schema=False)
    def openapi(user: Annotated[AppUser, Depends(page_user)]) -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    def docs(user: Annotated[AppUser, Depends(page_user)]) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="nightread review API")

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def fmt_date(value: str | None) -> str:
    if not value or len(value) != 8:
        return value or ""
    return f"{value[:4]}-{value[4:6]}-{value[6:]}"
