"""Data for data teams: `nightread cohort` (select, export, fine-tuning sets, de-identified copies) and
`deid reidentify`. Whatever leaves the database this way is audited."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flows.cli._common import console, database, fail, load_settings, runtime

app = typer.Typer()
deid_app = typer.Typer(help="De-identified exports.", no_args_is_help=True)


@app.command("cohort")
def cohort_cmd(
    where: Annotated[
        str, typer.Option("--where", help="cohort expression, e.g. 'pleural_effusion >= 0.8 and not pneumothorax'")
    ] = "",
    out: Annotated[
        Path | None, typer.Option("--out", help="write the rows to FILE.csv or FILE.parquet (+ manifest)")
    ] = None,
    per: Annotated[str, typer.Option(help="one row per study or per image")] = "study",
    model_version: Annotated[int | None, typer.Option(help="only this model version's findings")] = None,
    link_expiry: Annotated[int, typer.Option(help="per-image rows: presigned links valid this many seconds")] = 3600,
    finetune: Annotated[Path | None, typer.Option(help="also write images + train.jsonl (LLaVA format) here")] = None,
    answers: Annotated[str, typer.Option(help="fine-tuning answers: reviewed (labels only) or model")] = "reviewed",
    deid_out: Annotated[
        Path | None, typer.Option(help="also write a de-identified export (PS3.15 Annex E) into this new folder")
    ] = None,
) -> None:
    """Select studies or images by findings and metadata; print the count, or export them."""
    from db import reviews
    from db.cohort import CohortSyntaxError
    from db.models import AuditAction
    from db.session import session_scope
    from flows.cohort_export import cohort, model_version_info, write_finetune, write_table
    from flows.rules.questions import load_bank
    from flows.wiring.runtime import build_store

    if per not in ("study", "image"):
        raise fail("--per takes study or image", 2)
    if answers not in ("reviewed", "model"):
        raise fail("--answers takes reviewed or model", 2)
    settings = load_settings()
    bank = load_bank(settings.questions_file)
    with database(settings) as engine:
        try:
            result = cohort(
                engine,
                where,
                unit=per,  # type: ignore[arg-type]
                model_version_id=model_version,
                known_questions=[q.id for q in bank.questions],
            )
        except CohortSyntaxError as exc:
            raise fail(f"cohort expression: {exc}", 2) from None
        store = build_store(settings)
        console.print(f"{len(result.rows)} {per}(s) match")
        if out is not None:
            try:
                manifest = write_table(
                    result,
                    out,
                    store=store,
                    link_expiry_s=link_expiry,
                    model_versions=model_version_info(engine, result.model_version_ids),
                )
            except ValueError as exc:
                raise fail(str(exc), 2) from None
            console.print(f"wrote {manifest['rows']} row(s) to {out} and {out.name}.manifest.json")
        if finetune is not None:
            counts = write_finetune(
                engine,
                store,
                result=result,
                out_dir=finetune,
                question_texts={q.id: q.text for q in bank.questions},
                answers=answers,  # type: ignore[arg-type]
                model_version_id=model_version,
            )
            console.print(
                f"fine-tuning set: {counts['images']} image(s), {counts['turns']} turn(s) in {finetune}/train.jsonl"
            )
        if deid_out is not None:
            from flows.deid_export import export_deidentified
            from integrations.errors import NightreadError

            with runtime(settings) as rt:
                try:
                    m = export_deidentified(rt, result=result, out_dir=deid_out)
                except NightreadError as exc:
                    raise fail(str(exc), 2) from None
            console.print(
                f"de-identified: {m['studies']} studies, {m['dicom_files']} DICOM files, {m['pngs']} PNGs in {deid_out}"
            )
        if out is not None or finetune is not None or deid_out is not None:  # an export leaves the database
            with session_scope(engine) as session:
                reviews.audit(
                    session=session,
                    action=AuditAction.COHORT_EXPORTED,
                    actor=reviews.cli_actor(),
                    client="cli",
                    detail=(
                        f"{len(result.rows)} {per} row(s); table={out is not None} finetune={finetune is not None} "
                        f"deid={deid_out is not None}; where: {where[:400]}"
                    ),
                )


@deid_app.command("reidentify")
def deid_reidentify(pseudonym: Annotated[str, typer.Argument(help="a pseudonym from a de-identified export")]) -> None:
    """The original identifier behind a pseudonym (needs the de-identification key; an admin's task)."""
    from db import reviews
    from db.models import AuditAction
    from db.session import session_scope
    from flows.deid_export import reidentify

    with runtime(load_settings()) as rt:
        found = reidentify(rt, pseudonym)
        with session_scope(rt.engine) as session:  # who asked, and what kinds were found (never the originals)
            reviews.audit(
                session=session,
                action=AuditAction.REIDENTIFIED,
                actor=reviews.cli_actor(),
                subject=pseudonym[:80],
                client="cli",
                detail=f"{len(found)} original(s): {', '.join(k for k, _ in found) or 'none'}",
            )
    if not found:
        raise fail("no such pseudonym", 1)
    for kind, original in found:
        console.print(f"{kind}: {original}")


app.add_typer(deid_app, name="deid")
