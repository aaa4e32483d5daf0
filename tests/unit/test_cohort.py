"""Cohort expressions → SQL (bound parameters only), their results on known data, and the exports."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from sqlmodel import Session, func, select

from db import reviews
from db.cohort import CohortSyntaxError, parse_where, run_cohort
from db.models import Study
from db.session import session_scope
from flows.cohort_export import cohort, write_finetune, write_table
from tests.review_seed import TEXTS, seeded_database

KNOWN = list(TEXTS)


@pytest.fixture
def data(tmp_path):
    engine, store, seeded = seeded_database(tmp_path)
    yield engine, store, seeded
    engine.dispose()


def studies(engine, where: str, **kw) -> set[int]:
    return {r["study_id"] for r in cohort(engine, where, known_questions=KNOWN, **kw).rows}


def test_probability_thresholds_and_negation(data):
    engine, _, s = data
    cr, ct = s.study_ids["cr"], s.study_ids["ct"]
    assert studies(engine, "pleural_effusion >= 0.8") == {cr}
    assert studies(engine, "pleural_effusion >= 0.96") == set()
    assert studies(engine, "not pneumothorax") == {ct}, "CR has pneumothorax P(yes) 0.65"
    assert studies(engine, "pleural_effusion >= 0.8 and not pneumothorax") == set()
    assert studies(engine, "ct_lung_nodule > 0.7 or pleural_effusion >= 0.99") == {ct}
    assert studies(engine, "(ct_lung_nodule > 0.7 or pleural_effusion >= 0.9) and not ct_fracture") == {cr, ct}
    assert studies(engine, "") == {cr, ct}


def test_metadata_terms(data):
    engine, _, s = data
    cr, ct = s.study_ids["cr"], s.study_ids["ct"]
    assert studies(engine, "modality in (CT, MR)") == {ct}
    assert studies(engine, "modality = cr") == {cr}
    assert studies(engine, "study_date >= 2024-01-06") == {ct}
    assert studies(engine, "study_date < 2024-01-06 and view = PA") == {cr}
    assert studies(engine, "flagged") == {cr, ct}
    assert studies(engine, f"model_version = {s.model_version_id}") == {cr, ct}
    assert studies(engine, "pleural_effusion", model_version_id=s.model_version_id + 1) == set()


def test_review_state_and_answers_after_review(data):
    engine, _, s = data
    cr, ct = s.study_ids["cr"], s.study_ids["ct"]
    with session_scope(engine) as session:
        rita = reviews.get_user(session=session, name="rita")
        assert rita is not None
        reviews.decide(
            session=session, user=rita, finding_id=s.finding_ids["pneumothorax"], decision="correct", to_answer="no"
        )
        reviews.decide(session=session, user=rita, finding_id=s.finding_ids["ct_lung_nodule"], decision="reject")
        reviews.decide(session=session, user=rita, finding_id=s.finding_ids["pleural_effusion"], decision="confirm")
    assert studies(engine, "pneumothorax = no") == {cr}
    assert studies(engine, "pneumothorax >= 0.6") == {cr}, "thresholds read the model's probability"
    assert studies(engine, "ct_lung_nodule = no") == {ct}, "a rejected yes is a no"
    assert studies(engine, "review(pneumothorax) = corrected") == {cr}
    assert studies(engine, "review(pleural_effusion) = confirmed and pleural_effusion = yes") == {cr}
    assert studies(engine, "review(ct_fracture) = pending") == {ct}
    assert studies(engine, "review = reviewed") == {cr, ct}
    row = next(r for r in cohort(engine, "", known_questions=KNOWN).rows if r["study_id"] == cr)
    assert row["p_pneumothorax"] == pytest.approx(0.65)
    assert row["answer_pneumothorax"] == "no"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("effusion >= 0.5", "unknown question or field 'effusion'"),
        ("pneumothorax >= 1.5", "between 0 and 1"),
        ("pneumothorax >=", "ends too early"),
        ("(pneumothorax", "expected ')'"),
        ("pneumothorax and", "expected a question id or a field at the end"),
        ("pneumothorax pleural_effusion", "unexpected 'pleural_effusion'"),
        ("pneumothorax >= 0.5; DROP TABLE study", "unexpected character ';'"),
        ("study_date >= yesterday", "expected a date"),
        ("review(pneumothorax) = approved", "unknown review state"),
        ("modality > CT", "takes = or !="),
    ],
)
def test_bad_expressions_name_what_is_wrong(data, text, message):
    engine, _, _ = data
    with pytest.raises(CohortSyntaxError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cohort(engine, text, known_questions=KNOWN)


def test_user_text_is_bound_never_pasted_into_sql(data):
    engine, _, _ = data
    assert studies(engine, "modality = \"CR' OR '1'='1\"") == set()
    compiled = str(parse_where('modality = "x\' OR 1=1 --"', known_questions=KNOWN))
    assert "OR 1=1" not in compiled
    with Session(engine) as session:
        assert session.exec(select(func.count()).select_from(Study)).one() == 2


def test_csv_and_parquet_exports_with_manifest_and_links(data, tmp_path):
    engine, store, s = data
    per_study = cohort(engine, "flagged", known_questions=KNOWN)
    manifest = write_table(per_study, tmp_path / "out" / "cohort.csv")
    assert manifest["rows"] == 2
    assert manifest["query"] == "flagged"
    assert manifest["question_bank_versions"] == ["b1"]
    text = (tmp_path / "out" / "cohort.csv").read_text()
    assert text.splitlines()[0].startswith("study_id,study_date,modalities")
    assert "p_pleural_effusion" in text.splitlines()[0]
    per_image = cohort(engine, "pleural_effusion >= 0.9", unit="image", known_questions=KNOWN)
    write_table(per_image, tmp_path / "out" / "images.parquet", store=store, link_expiry_s=600)
    table = pq.read_table(tmp_path / "out" / "images.parquet")
    rows = table.to_pylist()
    assert [r["image_id"] for r in rows] == [s.image_ids["cr"]]
    assert table.schema.field("p_pleural_effusion").type == "double"
    assert rows[0]["link"].startswith("file://")
    on_disk = json.loads((tmp_path / "out" / "images.parquet.manifest.json").read_text())
    assert on_disk["unit"] == "image"
    assert on_disk["links_expire_at"]
    with pytest.raises(ValueError, match=r"\.csv or \.parquet"):
        write_table(per_study, tmp_path / "out" / "cohort.xlsx")


def test_finetune_export_uses_reviewed_labels_unless_asked_for_the_models(data, tmp_path):
    engine, store, s = data
    with session_scope(engine) as session:
        rita = reviews.get_user(session=session, name="rita")
        assert rita is not None
        reviews.decide(
            session=session, user=rita, finding_id=s.finding_ids["pneumothorax"], decision="correct", to_answer="no"
        )
    everything = cohort(engine, "", known_questions=KNOWN)
    counts = write_finetune(engine, store, result=everything, out_dir=tmp_path / "ft", question_texts=TEXTS)
    assert counts == {"images": 1, "turns": 1}
    (record,) = [json.loads(line) for line in (tmp_path / "ft" / "train.jsonl").read_text().splitlines()]
    assert record["conversations"] == [
        {"from": "human", "value": "<image>\nIs there a pneumothorax?"},
        {"from": "gpt", "value": "no"},
    ]
    assert (tmp_path / "ft" / record["image"]).read_bytes()[:4] == b"\x89PNG"
    counts = write_finetune(
        engine, store, result=everything, out_dir=tmp_path / "ft2", question_texts=TEXTS, answers="model"
    )
    assert counts["images"] == 2
    first = json.loads((tmp_path / "ft2" / "train.jsonl").read_text().splitlines()[0])
    assert first["conversations"][:2] == [
        {"from": "human", "value": "<image>\nDescribe this image."},
        {"from": "gpt", "value": "A CR image of the chest."},
    ]


def test_run_cohort_sees_questions_stored_but_not_in_the_bank(data):
    engine, _, s = data
    with Session(engine) as session:
        result = run_cohort(session=session, where="consolidation", known_questions=[])
    assert {r["study_id"] for r in result.rows} == {s.study_ids["cr"]}
