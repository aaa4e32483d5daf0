"""@flow validate: run the configured model over a labeled set, score it, fit a temperature, store the
results per model version and write a report; and the promotion gate (`nightread models promote`).

Labeled sets: (a) a folder in the VQA-RAD / SLAKE JSON layout (flows.rules.metrics.load_dataset), or
(b) "reviews": the review decisions in the database, as labels (db.reviews.labels)."""

from __future__ import annotations

import hashlib
import io
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image as PILImage
from prefect import flow, get_run_logger
from sqlmodel import Session, col, select

from db import reviews
from db.models import AuditAction, Finding, Image, ModelVersion, ValidationRun, utcnow
from db.session import session_scope
from flows.annotate import calibrate, ensure_model_version
from flows.rules.metrics import (
    METRICS,
    Example,
    Prediction,
    closed_pairs,
    expected_calibration_error,
    fit_temperature,
    image_path,
    load_dataset,
    reliability_diagram,
    score,
    write_predictions,
)
from flows.wiring.runtime import Runtime
from flows.wiring.settings import NightreadSettings, ValidationSettings
from integrations.errors import ConfigurationError
from integrations.imaging import render
from integrations.ports import AnnotationRequest, ImageContext, Question

BATCH = 8


@dataclass
class LabeledSet:
    name: str
    sha: str
    examples: list[Example]
    images: dict[str, tuple[bytes, ImageContext]]  # image key -> PNG bytes, prompt context


def _png(path: Path) -> bytes:
    if path.suffix.lower() in (".dcm", ".dicom"):
        return render(path).png
    with PILImage.open(path) as im:
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="PNG")
        return buf.getvalue()


def folder_set(folder: Path) -> LabeledSet:
    examples = load_dataset(folder)
    images: dict[str, tuple[bytes, ImageContext]] = {}
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(json.dumps([ex.image, ex.question, ex.answer, ex.kind]).encode())
        if ex.image not in images:
            data = _png(image_path(folder, ex.image))
            digest.update(hashlib.sha256(data).digest())
            modality = ex.modality if ex.modality != "unknown" else ""
            images[ex.image] = (data, ImageContext(modality=modality))
    return LabeledSet(name=folder.name, sha=digest.hexdigest(), examples=examples, images=images)


def reviews_set(rt: Runtime) -> LabeledSet:
    """Every finding a reviewer decided on, with the reviewer's answer as the label."""
    with Session(rt.engine) as session:
        labels = reviews.labels(session=session)
        rows = session.exec(
            select(Finding, Image)
            .join(Image, col(Image.id) == Finding.image_id)
            .where(col(Finding.id).in_(list(labels)))
            .order_by(col(Finding.id))
        ).all()
    examples: list[Example] = []
    images: dict[str, tuple[bytes, ImageContext]] = {}
    digest = hashlib.sha256()
    for finding, image in rows:
        key = f"image-{image.id}"
        label = labels[finding.id or -1]
        examples.append(Example(key, finding.question_id, label, finding.kind, image.modality))
        digest.update(json.dumps([key, finding.question_id, label]).encode())
        if key not in images:
            ctx = ImageContext(
                modality=image.modality,
                body_part=image.body_part or "",
                view=image.view or "",
                patient_position=image.patient_position or "",
            )
            images[key] = (rt.store.get(image.object_key), ctx)
    return LabeledSet(name="reviews", sha=digest.hexdigest(), examples=examples, images=images)


def predict(rt: Runtime, labeled: LabeledSet) -> list[Prediction]:
    """Ask the model every labeled question (and for a caption where one is labeled); P(yes) raw."""
    texts = {q.id: q for q in rt.bank.questions}
    per_image: dict[str, list[Example]] = defaultdict(list)
    for ex in labeled.examples:
        per_image[ex.image].append(ex)
    annotator = rt.annotator()
    out: list[Prediction] = []
    keys = list(per_image)
    for start in range(0, len(keys), BATCH):
        chunk = keys[start : start + BATCH]
        requests, asked = [], []
        for key in chunk:
            questions: list[Question] = []
            mapping: dict[str, str | None] = {}
            for n, ex in enumerate(per_image[key]):
                if ex.question is None:
                    continue
                bank_q = texts.get(ex.question)
                qid = f"q{n}"
                questions.append(
                    Question(
                        id=qid,
                        text=bank_q.text if bank_q else ex.question,
                        kind="closed" if ex.kind == "closed" else "open",
                        prompt=bank_q.prompt if bank_q else None,
                    )
                )
                mapping[qid] = ex.question
            png, ctx = labeled.images[key]
            wants_caption = any(ex.question is None for ex in per_image[key])
            requests.append(
                AnnotationRequest(
                    image_png=png,
                    context=ctx,
                    questions=tuple(questions),
                    caption=wants_caption,
                    caption_max_new_tokens=rt.settings.inference.caption_max_new_tokens,
                )
            )
            asked.append((key, mapping))
        for (key, mapping), result in zip(asked, annotator.annotate(requests), strict=True):
            if result.caption is not None:
                out.append(Prediction(key, None, result.caption))
            for answer in result.answers:
                question = mapping[answer.question_id]
                if answer.p_yes is not None:
                    out.append(Prediction(key, question, "yes" if answer.p_yes >= 0.5 else "no", answer.p_yes))
                else:
                    out.append(Prediction(key, question, answer.text))
    return out


def _fmt(v: Any) -> str:
    return "–" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def write_report(
    out: Path, *, model: dict[str, Any], labeled: LabeledSet, metrics: dict[str, Any], extra: dict[str, Any]
) -> Path:
    """report.md with the tables and the reliability diagrams beside it (PNG)."""
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# Validation of {model['name']} (revision {model['revision']}, model version {model['id']})",
        "",
        f"Labeled set: `{labeled.name}` (sha256 {labeled.sha[:12]}), {len(labeled.examples)} examples, "
        f"{len(labeled.images)} images. Probabilities are the model's raw P(yes) (temperature 1).",
        "",
        "| scope | n | " + " | ".join(METRICS) + " |",
        "|---|---|" + "---|" * len(METRICS),
    ]
    rows = [("overall", metrics["overall"])]
    rows += [(f"modality {k}", v) for k, v in metrics["per_modality"].items()]
    rows += [(f"question {k}", v) for k, v in metrics["per_question"].items()]
    for name, m in rows:
        lines.append(f"| {name} | {m['n']} | " + " | ".join(_fmt(m[k]) for k in METRICS) + " |")
    lines += [
        "",
        f"Fitted temperature: {_fmt(extra.get('temperature'))}; ECE after temperature scaling (on the same "
        f"set, so optimistic): {_fmt(extra.get('ece_calibrated'))}.",
        "",
        "![reliability](reliability.png)",
        "",
        "Metric definitions: closed accuracy on yes/no; open-question token recall and F1 (LLaVA-Med "
        "convention); caption ROUGE-1/ROUGE-L F (rouge-score, stemmed) and corpus BLEU (sacrebleu); AUROC "
        "and 10-bin ECE of P(yes).",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@flow(name="validate", log_prints=False)
def validate(
    dataset: str,
    settings: NightreadSettings | None = None,
    report: Path | None = None,
    predictions_out: Path | None = None,
    apply_temperature: bool = True,
    model: str | None = None,
    revision: str | None = None,
) -> dict[str, Any]:
    """Score the configured model (or `model`/`revision`) on `dataset` (a folder, or "reviews"); store
    the run; optionally store the fitted temperature on the model version, write a report and the
    predictions."""
    settings = settings or NightreadSettings()
    if model is not None:
        settings = settings.model_copy(
            update={"inference": settings.inference.model_copy(update={"model": model, "revision": revision})}
        )
    logger = get_run_logger()
    with Runtime.build(settings) as rt:
        labeled = reviews_set(rt) if dataset == "reviews" else folder_set(Path(dataset))
        if not labeled.examples:
            raise ConfigurationError(f"the labeled set {dataset!r} has no examples")
        mv_id = ensure_model_version(rt)
        predictions = predict(rt, labeled)
        metrics = score(labeled.examples, predictions)
        ps, ys = closed_pairs(labeled.examples, predictions)
        temperature = fit_temperature(ps, ys) if ps else None
        calibrated = [calibrate(p, temperature) for p in ps] if temperature else ps
        extra = {
            "temperature": temperature,
            "ece_calibrated": expected_calibration_error(calibrated, ys) if ps else None,
        }
        with session_scope(rt.engine) as session:
            mv = session.get(ModelVersion, mv_id)
            assert mv is not None
            run = ValidationRun(
                model_version_id=mv_id,
                dataset=labeled.name,
                dataset_sha=labeled.sha,
                examples=len(labeled.examples),
                metrics={**metrics, **extra},
                temperature=temperature,
                created_at=utcnow(),
            )
            session.add(run)
            if apply_temperature and temperature is not None:
                mv.temperature = temperature
                session.add(mv)
            session.flush()
            model_row = {"id": mv.id, "name": mv.name, "revision": mv.revision}
            run_id = run.id
        if predictions_out is not None:
            write_predictions(predictions_out, predictions)
        report_path = None
        if report is not None:
            reliability_diagram(ps, ys, report / "reliability.png", title=f"{model_row['name']}: raw P(yes)")
            if temperature:
                reliability_diagram(
                    calibrated, ys, report / "reliability-calibrated.png", title=f"T = {temperature:.2f}"
                )
            report_path = write_report(report, model=model_row, labeled=labeled, metrics=metrics, extra=extra)
        logger.info("validation run %s of model version %s: %d examples", run_id, mv_id, len(labeled.examples))
    return {
        "validation_run_id": run_id,
        "model_version_id": mv_id,
        "dataset": labeled.name,
        "examples": len(labeled.examples),
        "metrics": metrics,
        **extra,
        "report": str(report_path) if report_path else None,
    }


# --- the promotion gate ------------------------------------------------------------------------------


def gate_failures(run: ValidationRun | None, minimums: ValidationSettings) -> list[str]:
    """Why a validation run does not allow promotion ([] when it does)."""
    if run is None:
        return ["no validation run for this model version (run `nightread validate` first)"]
    overall = run.metrics.get("overall", {})
    problems = []
    if run.examples < minimums.min_examples:
        problems.append(f"{run.examples} examples < {minimums.min_examples}")
    checks: Sequence[tuple[str, float, bool]] = (
        ("closed_accuracy", minimums.min_closed_accuracy, True),
        ("auroc", minimums.min_auroc, True),
        ("ece", minimums.max_ece, False),
    )
    for name, bound, at_least in checks:
        value = overall.get(name)
        if value is None:
            problems.append(f"{name} not measured")
        elif (value < bound) if at_least else (value > bound):
            problems.append(f"{name} {value:.3f} {'<' if at_least else '>'} {bound:.3f}")
    return problems


def promote(engine: Any, *, model_version_id: int, minimums: ValidationSettings, actor: str = "system") -> ModelVersion:
    """Make a model version the promoted default; refuses (PermissionError, with every reason) unless
    its latest validation run meets the minimums. The promotion is audited under `actor`."""
    with session_scope(engine) as session:
        mv = session.get(ModelVersion, model_version_id)
        if mv is None:
            raise ValueError(f"no model version {model_version_id}")
        run = session.exec(
            select(ValidationRun)
            .where(ValidationRun.model_version_id == model_version_id)
            .order_by(col(ValidationRun.id).desc())
        ).first()
        problems = gate_failures(run, minimums)
        if problems:
            raise PermissionError("; ".join(problems))
        for other in session.exec(select(ModelVersion).where(col(ModelVersion.promoted_at).is_not(None))).all():
            other.promoted_at = None
            session.add(other)
        mv.promoted_at = utcnow()
        session.add(mv)
        reviews.audit(
            session=session,
            action=AuditAction.MODEL_PROMOTED,
            actor=actor,
            subject=f"model_version:{mv.id}",
            client="cli",
            detail=f"{mv.name} {mv.revision or ''}".strip()[:400],
        )
        session.flush()
        session.expunge(mv)
        return mv
