"""The JSON API under /api (documented by /openapi.json through the models of `review.models`), the
schema itself behind a login, and /healthz. Every /api route but /api/token needs a bearer token from
POST /api/token or the page's session cookie (a cookie-authenticated write also needs `X-CSRF-Token`).

(No `from __future__ import annotations`: FastAPI reads these annotations at run time.)"""

from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Form, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse

from db import reviews
from db.cohort import MAX_ID, CohortSyntaxError, run_cohort
from db.models import AuditAction
from review.auth import check_login
from review.deps import ApiDecider, ApiUser, SessionDep, StateDep, client_of
from review.hooks import after_decision
from review.models import (
    CaptionPublic,
    CohortPublic,
    DecisionIn,
    DecisionRecorded,
    FindingPublic,
    Health,
    ImagePublic,
    PatientPublic,
    Problem,
    QueueCounts,
    QueueItemPublic,
    QueuePage,
    StudyPublic,
    Token,
)
from review.views import COUNT_LIMIT, MAX_PAGE, MAX_PAGE_SIZE, queue_view, study_view

UNAUTHENTICATED: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "no valid bearer token or session cookie"}
}

router = APIRouter(prefix="/api")
service_router = APIRouter(include_in_schema=False)


@router.post(
    "/token",
    tags=["auth"],
    summary="A bearer token for the API",
    description="Throttled like the login page: too many failures lock the user name or the client "
    "address (429 with Retry-After). A password change or reset revokes the user's tokens.",
    responses={
        401: {"model": Problem, "description": "wrong user name or password"},
        429: {"model": Problem, "description": "the user name or the client address is locked (see Retry-After)"},
    },
)
def api_token(
    request: Request,
    session: SessionDep,
    state: StateDep,
    username: Annotated[str, Form()],
    password: Annotated[str, Form()],
) -> Token:
    result = check_login(
        session=session,
        username=username,
        password=password,
        client=client_of(request),
        policy=state.policy,
        secret=state.config.secret,
        now=state.config.clock(),
        purpose="api",
    )
    session.commit()
    if result.user is None:
        headers = {"WWW-Authenticate": "Bearer"}
        if result.retry_after_s is not None:
            headers["Retry-After"] = str(result.retry_after_s)
        message = "wrong user name or password" if result.status == 401 else result.message
        raise HTTPException(result.status, message, headers=headers)
    return Token(access_token=state.tokens.issue(result.user), expires_in=state.tokens.ttl_s)


@router.get(
    "/queue",
    tags=["review"],
    summary="The flag queue, filtered and ordered like the page",
    responses={400: {"model": Problem, "description": "a bad query parameter (named)"}, **UNAUTHENTICATED},
)
def api_queue(
    request: Request,
    session: SessionDep,
    state: StateDep,
    user: ApiUser,
    page: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 1,
    page_size: Annotated[
        int | None, Query(ge=1, le=MAX_PAGE_SIZE, description="findings per page (default: the page's)")
    ] = None,
    order: Annotated[str, Query(description="critical | uncertain")] = "critical",
    review_state: Annotated[
        str, Query(alias="state", description="pending | confirmed | rejected | corrected | any")
    ] = "pending",
    modality: str | None = None,
    question: str | None = None,
    date_from: Annotated[str | None, Query(description="YYYY-MM-DD")] = None,
    date_to: Annotated[str | None, Query(description="YYYY-MM-DD")] = None,
    model_version: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    flagged_only: bool = False,
) -> QueuePage:
    # the declared parameters document and bound the query; the filter reads them as the page does
    view = queue_view(
        session=session,
        params={k: str(v) for k, v in request.query_params.items()},
        page=page,
        size=page_size or state.config.page_size,
        critical_ids=state.config.critical_ids,
    )
    return QueuePage(
        items=[QueueItemPublic.model_validate(i, from_attributes=True) for i in view.items],
        total=view.total,
        more=view.more,
        page=view.page,
        pages=view.pages,
        counts=QueueCounts.model_validate({**view.counts, "counted_to": COUNT_LIMIT}),
    )


@router.get(
    "/studies/{study_id}",
    tags=["review"],
    summary="A study's images, captions and findings",
    responses={404: {"model": Problem, "description": "no such study"}, **UNAUTHENTICATED},
)
def api_study(
    study_id: Annotated[int, PathParam(ge=1, le=MAX_ID)],
    session: SessionDep,
    state: StateDep,
    user: ApiUser,
) -> StudyPublic:
    view = study_view(session=session, study_id=study_id, show_identifiers=state.config.show_patient_identifiers)
    study, ident = view.study, view.identity
    assert study.id is not None
    images = []
    for entry in view.images:
        image = entry.image
        assert image.id is not None
        findings = []
        for f in entry.findings:
            assert f.id is not None
            review_state, corrected = view.states[f.id]
            findings.append(
                FindingPublic(
                    id=f.id,
                    question_id=f.question_id,
                    question=state.texts.get(f.question_id, f.question_id),
                    kind=f.kind,
                    answer=f.answer,
                    probability=f.probability,
                    flagged=f.flagged,
                    model_version_id=f.model_version_id,
                    bank_version=f.bank_version,
                    review_state=review_state,
                    corrected_answer=corrected,
                )
            )
        images.append(
            ImagePublic(
                id=image.id,
                url=f"/images/{image.id}",
                modality=image.modality,
                view=image.view,
                ct_window=image.ct_window,
                render_version=image.render_version,
                captions=[CaptionPublic(model_version_id=c.model_version_id, text=c.text) for c in entry.captions],
                findings=findings,
            )
        )
    patient = (
        PatientPublic(name=ident.patient_name, id=ident.patient_id, accession_number=ident.accession_number)
        if ident is not None
        else None
    )
    return StudyPublic(
        id=study.id,
        study_date=study.study_date,
        modalities=study.modalities,
        status=study.status,
        images=images,
        patient=patient,
    )


@router.post(
    "/findings/{finding_id}/decision",
    tags=["review"],
    status_code=201,
    summary="Decide on a finding",
    responses={
        403: {"model": Problem, "description": "the user may not decide, or a cookie write without X-CSRF-Token"},
        404: {"model": Problem, "description": "no such finding"},
        **UNAUTHENTICATED,
    },
)
def api_decide(
    background: BackgroundTasks,
    finding_id: Annotated[int, PathParam(ge=1, le=MAX_ID)],
    body: DecisionIn,
    session: SessionDep,
    state: StateDep,
    user: ApiDecider,
) -> DecisionRecorded:
    """Append a decision (confirm, reject, correct with `to_answer`, or comment) to the finding's
    history; a decision that cannot be recorded as given is a 422 saying why."""
    row = reviews.decide(
        session=session,
        user=user,
        finding_id=finding_id,
        decision=body.decision,
        to_answer=body.to_answer,
        comment=body.comment,
    )
    session.commit()
    after_decision(background, session=session, config=state.config, finding_id=finding_id, decision=body.decision)
    review_state, corrected = reviews.finding_states(session=session, finding_ids=[finding_id])[finding_id]
    assert row.id is not None
    return DecisionRecorded(
        review_id=row.id,
        finding_id=finding_id,
        review_state=review_state,
        corrected_answer=corrected,
    )


@router.get(
    "/cohort",
    tags=["cohorts"],
    summary="Studies or images matching a cohort expression",
    responses={400: {"model": Problem, "description": "a bad cohort expression or parameter"}, **UNAUTHENTICATED},
)
def api_cohort(
    request: Request,
    session: SessionDep,
    state: StateDep,
    user: ApiUser,
    where: Annotated[
        str, Query(description="e.g. pleural_effusion >= 0.8 and not pneumothorax (at most 2000 characters)")
    ] = "",
    per: Annotated[str, Query(description="study | image")] = "study",
    model_version: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
) -> CohortPublic:
    if per not in ("study", "image"):
        raise HTTPException(400, "per is study or image")
    try:
        result = run_cohort(
            session=session,
            where=where,
            unit=per,  # type: ignore[arg-type]
            model_version_id=model_version,
            known_questions=list(state.texts),
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
        now=state.config.clock(),
    )
    session.commit()
    for r in rows:
        if "image_id" in r:
            r["url"] = f"/images/{r['image_id']}"
    return CohortPublic(
        where=where,
        per=per,
        count=len(rows),
        rows=rows,
        model_version_ids=result.model_version_ids,
        question_bank_versions=result.bank_versions,
    )


# --- the schema, behind a login like every page; health -------------------------------------------------


@service_router.get("/openapi.json")
def openapi(request: Request, user: ApiUser) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@service_router.get("/healthz")
def healthz() -> Health:
    return Health()
