"""Cohorts as files: CSV or Parquet (one row per study or per image) with object-store links and a
manifest, and a fine-tuning export (images + JSONL in the LLaVA conversation format)."""

from __future__ import annotations

import csv
import datetime as dt
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from sqlmodel import Session, col, select

from db import reviews
from db.cohort import CohortResult, Unit, run_cohort
from db.models import Caption, Finding, Image, ModelVersion
from integrations.ports import ObjectStore
from integrations.sr import nightread_version

Answers = Literal["reviewed", "model"]


def cohort(
    engine: Any,
    where: str,
    *,
    unit: Unit = "study",
    model_version_id: int | None = None,
    known_questions: Sequence[str] = (),
) -> CohortResult:
    """The Python entry point: the rows of a cohort expression (see `db.cohort` for the language)."""
    with Session(engine) as session:
        return run_cohort(
            session=session,
            where=where,
            unit=unit,
            model_version_id=model_version_id,
            known_questions=known_questions,
        )


def _columns(result: CohortResult, rows: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        for k in row:
            seen.setdefault(k, None)
    base = [k for k in seen if not k.startswith(("p_", "answer_"))]
    per_question = [f"{prefix}{q}" for q in result.questions for prefix in ("p_", "answer_") if f"{prefix}{q}" in seen]
    return base + per_question


def write_table(
    result: CohortResult,
    out: Path,
    *,
    store: ObjectStore | None = None,
    link_expiry_s: int = 3600,
    model_versions: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """Write the rows to `out` (.csv or .parquet) and `out`.manifest.json; image rows get a `link`
    (a presigned URL for S3, valid `link_expiry_s`). Returns the manifest."""
    suffix = out.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise ValueError(f"the output file must end in .csv or .parquet, not {out.name!r}")
    rows = [dict(r) for r in result.rows]
    if store is not None and result.unit == "image":
        for r in rows:
            r["link"] = store.link(r["object_key"], expires_s=link_expiry_s)
    columns = _columns(result, rows) if rows else ["study_id" if result.unit == "study" else "image_id"]
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".csv":
        with out.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows], schema=_schema(columns, rows))
        pq.write_table(table, out)
    manifest = {
        "query": result.where,
        "unit": result.unit,
        "rows": len(rows),
        "studies": len({r["study_id"] for r in rows}),
        "file": out.name,
        "columns": columns,
        "model_versions": list(model_versions),
        "question_bank_versions": result.bank_versions,
        "render_versions": result.render_versions,
        "links_expire_at": (
            (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=link_expiry_s)).isoformat(timespec="seconds")
            if store is not None and result.unit == "image"
            else None
        ),
        "nightread_version": nightread_version(),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    out.with_name(out.name + ".manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _schema(columns: list[str], rows: list[dict[str, Any]]) -> Any:
    import pyarrow as pa

    def kind(c: str) -> Any:
        if c.startswith("p_"):
            return pa.float64()
        if c in ("study_id", "image_id", "frame"):
            return pa.int64()
        return pa.string()

    return pa.schema([(c, kind(c)) for c in columns])


def model_version_info(engine: Any, ids: Sequence[int]) -> list[dict[str, Any]]:
    with Session(engine) as session:
        rows = session.exec(select(ModelVersion).where(col(ModelVersion.id).in_(list(ids)))).all()
    return [
        {"id": m.id, "name": m.name, "revision": m.revision, "backend": m.backend, "temperature": m.temperature}
        for m in rows
    ]


def write_finetune(
    engine: Any,
    store: ObjectStore,
    *,
    result: CohortResult,
    out_dir: Path,
    question_texts: dict[str, str],
    answers: Answers = "reviewed",
    model_version_id: int | None = None,
) -> dict[str, int]:
    """Images + `train.jsonl` in the LLaVA conversation format (one record per image:
    {"id", "image", "conversations": [{"from": "human", "value": "<image>\\n…"}, {"from": "gpt", …}, …]}).
    `answers="reviewed"`: only answers a reviewer confirmed or corrected (or rejected, for closed
    questions), and no captions; `answers="model"`: the model's captions and answers as they are."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "images").mkdir(exist_ok=True)
    study_ids = {r["study_id"] for r in result.rows}
    image_filter = {r["image_id"] for r in result.rows} if result.unit == "image" else None
    counts = {"images": 0, "turns": 0}
    with Session(engine) as session:
        labels = reviews.labels(session=session) if answers == "reviewed" else {}
        images = session.exec(
            select(Image).where(col(Image.study_id).in_(list(study_ids))).order_by(col(Image.id))
        ).all()
        fscope: list[Any] = [col(Finding.study_id).in_(list(study_ids))]
        if model_version_id is not None:
            fscope.append(col(Finding.model_version_id) == model_version_id)
        findings: dict[int, list[Finding]] = {}
        for f in session.exec(select(Finding).where(*fscope).order_by(col(Finding.id))).all():
            findings.setdefault(f.image_id, []).append(f)
        captions: dict[int, str] = {}
        if answers == "model":
            cscope: list[Any] = [col(Caption.image_id).in_([i.id for i in images])]
            if model_version_id is not None:
                cscope.append(col(Caption.model_version_id) == model_version_id)
            for c in session.exec(select(Caption).where(*cscope).order_by(col(Caption.id))).all():
                captions.setdefault(c.image_id, c.text)
    with (out_dir / "train.jsonl").open("w", encoding="utf-8") as fh:
        for image in images:
            assert image.id is not None
            if image_filter is not None and image.id not in image_filter:
                continue
            turns: list[tuple[str, str]] = []
            if image.id in captions:
                turns.append(("Describe this image.", captions[image.id]))
            for f in findings.get(image.id, []):
                answer = labels.get(f.id or -1) if answers == "reviewed" else f.answer
                if answer:
                    turns.append((question_texts.get(f.question_id, f.question_id), answer))
            if not turns:
                continue
            name = f"images/{image.id}.png"
            (out_dir / name).write_bytes(store.get(image.object_key))
            conversations: list[dict[str, str]] = []
            for n, (question, answer) in enumerate(turns):
                conversations.append({"from": "human", "value": ("<image>\n" if n == 0 else "") + question})
                conversations.append({"from": "gpt", "value": answer})
            record = {"id": f"nightread-{image.id}", "image": name, "conversations": conversations}
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            counts["images"] += 1
            counts["turns"] += len(turns)
    return counts
