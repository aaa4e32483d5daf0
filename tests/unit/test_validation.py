"""The validate flow with the tiny model: a labeled folder and review decisions as labels; results
stored per model version; `nightread score` recomputes the same metrics from the predictions file;
the promotion gate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from sqlmodel import Session, select

from db import reviews
from db.migrate import upgrade
from db.models import AuditAction, AuditEvent, ModelVersion, ValidationRun
from db.session import make_engine, session_scope
from flows.annotate import check_promoted
from flows.validate import promote, validate
from flows.wiring.runtime import Runtime
from flows.wiring.settings import ValidationSettings
from integrations.errors import ConfigurationError
from integrations.imaging import render
from integrations.sample_pacs import generate_studies
from integrations.storage import LocalObjectStore
from tests.review_seed import seed

pytestmark = pytest.mark.slow
NIGHTREAD = str(Path(sys.executable).parent / "nightread")


@pytest.fixture(scope="module")
def labeled(tmp_path_factory) -> Path:
    """Six rendered synthetic images; closed, open and caption labels."""
    folder = tmp_path_factory.mktemp("labeled")
    entries = []
    studies = generate_studies(seed=11)
    picked = [s.instances[0] for s in studies][:4]
    for n, ds in enumerate(picked):
        name = f"img{n}.png"
        (folder / name).write_bytes(render(ds).png)
        modality = str(ds.Modality)
        entries.append(
            {
                "image_name": name,
                "question": "Is there a pleural effusion?",
                "answer": "yes" if n % 2 else "no",
                "answer_type": "CLOSED",
                "modality": modality,
            }
        )
        entries.append(
            {
                "image_name": name,
                "question": "Is there a fracture?",
                "answer": "no" if n % 3 else "yes",
                "answer_type": "CLOSED",
                "modality": modality,
            }
        )
        entries.append(
            {
                "image_name": name,
                "question": "Which organ is shown?",
                "answer": "the lungs",
                "answer_type": "OPEN",
                "modality": modality,
            }
        )
        entries.append({"image_name": name, "question": None, "answer": f"a {modality} image", "modality": modality})
    (folder / "dataset.json").write_text(json.dumps(entries))
    return folder


def test_validate_a_folder_then_score_the_predictions_elsewhere(prefect_harness, make_settings, labeled, tmp_path):
    settings = make_settings()
    upgrade(settings.database_url)
    result = validate(
        str(labeled), settings=settings, report=tmp_path / "report", predictions_out=tmp_path / "preds.jsonl"
    )
    overall = result["metrics"]["overall"]
    assert (overall["n_closed"], overall["n_open"], overall["n_captions"], overall["missing"]) == (8, 4, 4, 0)
    for name in ("closed_accuracy", "open_recall", "open_f1", "rouge1", "rougeL", "bleu", "auroc", "ece"):
        assert overall[name] is not None, name
    assert set(result["metrics"]["per_modality"]) == {
        str(s.instances[0].Modality) for s in generate_studies(seed=11)[:4]
    }
    assert "Is there a fracture?" in result["metrics"]["per_question"]
    engine = make_engine(settings.database_url)
    with Session(engine) as session:
        (run,) = session.exec(select(ValidationRun)).all()
        mv = session.get(ModelVersion, run.model_version_id)
        assert mv is not None
        assert run.examples == 16
        assert run.metrics["overall"] == overall
        assert mv.temperature == pytest.approx(result["temperature"]), "the fitted temperature is stored"
    engine.dispose()
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| overall | 16 |" in report
    assert (tmp_path / "report" / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    # the same metrics from the predictions file alone, in another process
    scored = subprocess.run(
        [NIGHTREAD, "score", "--dataset", str(labeled), "--predictions", str(tmp_path / "preds.jsonl"), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(scored.stdout)["overall"] == pytest.approx(overall)


def test_validate_on_review_decisions(prefect_harness, make_settings, tmp_path):
    settings = make_settings()
    upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    seeded = seed(engine, LocalObjectStore(settings.storage_root))
    with session_scope(engine) as session:
        rita = reviews.get_user(session=session, name="rita")
        assert rita is not None
        reviews.decide(
            session=session, user=rita, finding_id=seeded.finding_ids["pleural_effusion"], decision="confirm"
        )
        reviews.decide(session=session, user=rita, finding_id=seeded.finding_ids["ct_lung_nodule"], decision="reject")
        reviews.decide(
            session=session,
            user=rita,
            finding_id=seeded.finding_ids["xr_impression"],
            decision="correct",
            to_answer="small effusion",
        )
    engine.dispose()
    result = validate("reviews", settings=settings)
    overall = result["metrics"]["overall"]
    assert (result["dataset"], overall["n_closed"], overall["n_open"]) == ("reviews", 2, 1)
    assert set(result["metrics"]["per_question"]) == {"pleural_effusion", "ct_lung_nodule", "xr_impression"}


def test_promotion_gate(prefect_harness, make_settings, labeled):
    settings = make_settings(inference={"require_promoted": True})
    upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    with Runtime.build(settings) as rt, pytest.raises(ConfigurationError, match="not promoted"):
        check_promoted(rt)
    from flows.nightly import run_nightly

    with pytest.raises(ConfigurationError, match="not promoted"):
        run_nightly(settings)  # before anything is retrieved
    with Session(engine) as session:
        (mv,) = session.exec(select(ModelVersion)).all()
    with pytest.raises(PermissionError, match="no validation run"):
        promote(engine, model_version_id=mv.id, minimums=settings.validation)
    validate(str(labeled), settings=settings, model=settings.inference.model)  # the model named explicitly
    strict = ValidationSettings(min_examples=100, min_closed_accuracy=0.99, min_auroc=0.99, max_ece=0.0)
    with pytest.raises(PermissionError, match=r"16 examples < 100.*closed_accuracy"):
        promote(engine, model_version_id=mv.id, minimums=strict)
    lenient = ValidationSettings(min_examples=1, min_closed_accuracy=0.0, min_auroc=0.0, max_ece=1.0)
    assert promote(engine, model_version_id=mv.id, minimums=lenient, actor="cli:qa").promoted_at is not None
    with Session(engine) as session:  # the promotion is in the audit log; the refusals changed nothing
        events = session.exec(select(AuditEvent).where(AuditEvent.action == AuditAction.MODEL_PROMOTED)).all()
        assert [(e.actor, e.subject) for e in events] == [("cli:qa", f"model_version:{mv.id}")]
    with Runtime.build(settings) as rt:
        assert check_promoted(rt) == mv.id
    engine.dispose()
