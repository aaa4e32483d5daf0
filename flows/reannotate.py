"""@flow reannotate: a new model or question bank over studies already rendered, without the PACS.

The studies are chosen by a cohort expression (`nightread cohort`'s language); their images come
from the object store, so the PACS is never contacted, and images already annotated by the same
model version and question-bank version are skipped (idempotent by key)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from prefect import flow

from db import repository as repo
from db.cohort import run_cohort
from db.session import session_scope
from flows.annotate import annotate_images, check_promoted
from flows.wiring.runtime import Runtime
from flows.wiring.settings import NightreadSettings


@flow(name="reannotate", log_prints=False)
def reannotate(
    where: str = "",
    model: str | None = None,
    revision: str | None = None,
    settings: NightreadSettings | None = None,
) -> dict[str, Any]:
    """Annotate the rendered images of the studies matching the cohort expression `where` with the
    configured model (or `model`/`revision`) and question bank; images come from the object store and
    the PACS is not contacted. Images already annotated by that model and bank version are skipped."""
    settings = settings or NightreadSettings()
    if model is not None:
        settings = settings.model_copy(
            update={"inference": settings.inference.model_copy(update={"model": model, "revision": revision})}
        )
    counts: Counter[str] = Counter()
    with Runtime.build(settings) as rt:
        with session_scope(rt.engine) as session:
            result = run_cohort(session=session, where=where, known_questions=[q.id for q in rt.bank.questions])
            run_id = repo.start_run(
                session=session,
                kind="reannotate",
                flow_run_id=None,
                parameters={"where": where, "model": settings.inference.model},
            )
        model_version_id = check_promoted(rt)
        status = "failed"
        try:
            for row in result.rows:
                with session_scope(rt.engine) as session:
                    image_ids = repo.image_ids(session=session, study_id=row["study_id"])
                counts["studies"] += 1
                counts["images"] += len(image_ids)
                counts.update(annotate_images(rt, row["study_id"], image_ids, model_version_id))
            status = "completed"
        finally:
            out: dict[str, Any] = {**counts, "model_version_id": model_version_id}
            with session_scope(rt.engine) as session:
                repo.finish_run(session=session, run_id=run_id, status=status, counts=out)
    return out
