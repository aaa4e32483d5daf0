"""Validation metrics on small labeled sets whose values are known by hand; ROUGE and BLEU against
the reference packages' own outputs."""

from __future__ import annotations

import json
import math

import pytest

from flows.rules.metrics import (
    DatasetError,
    Example,
    Prediction,
    expected_calibration_error,
    fit_temperature,
    load_dataset,
    load_predictions,
    reliability_diagram,
    score,
    token_f1,
    token_recall,
)


def test_closed_accuracy_auroc_and_ece_by_hand():
    examples = [Example(f"i{n}.png", "Is there an effusion?", ans, "closed", "DX") for n, ans in enumerate("yyynn")]
    examples = [Example(e.image, e.question, "yes" if e.answer == "y" else "no", "closed", "DX") for e in examples]
    preds = [
        Prediction("i0.png", "Is there an effusion?", "yes", 0.95),
        Prediction("i1.png", "is there an effusion?", "Yes.", 0.85),  # question matched case-insensitively
        Prediction("i2.png", "Is there an effusion?", "no", 0.25),
        Prediction("i3.png", "Is there an effusion?", "no", 0.15),
        Prediction("i4.png", "Is there an effusion?", "yes", 0.55),
    ]
    m = score(examples, preds)["overall"]
    assert m["closed_accuracy"] == pytest.approx(3 / 5)
    # positives {0.95, 0.85, 0.25} vs negatives {0.15, 0.55}: 5 of 6 pairs ranked right
    assert m["auroc"] == pytest.approx(5 / 6)
    # bins: 0.95 (y) |0.95-1|, 0.85 (y) |0.85-1|, 0.25 (y) |0.25-1|, 0.15 (n) |0.15|, 0.55 (n) |0.55|
    assert m["ece"] == pytest.approx((0.05 + 0.15 + 0.75 + 0.15 + 0.55) / 5)
    assert m["missing"] == 0


def test_ece_bins_average_within_a_bin():
    # one bin (0.6-0.7) holding 0.62 and 0.68, one yes one no: |0.5 - 0.65| = 0.15
    assert expected_calibration_error([0.62, 0.68], [1, 0]) == pytest.approx(0.15)


def test_open_token_recall_and_f1_by_hand():
    assert token_recall("left lower lobe", "the left lobe") == pytest.approx(2 / 3)
    # prediction tokens: the, left, lobe (3); reference: left, lower, lobe (3); common 2 -> P=R=2/3
    assert token_f1("left lower lobe", "the left lobe") == pytest.approx(2 / 3)
    assert token_recall("Axial.", "axial plane") == 1.0
    assert token_f1("", "anything") == 0.0


def test_captions_match_rouge_score_and_sacrebleu():
    import sacrebleu
    from rouge_score import rouge_scorer

    refs = ["a frontal chest radiograph with clear lungs", "axial ct of the chest showing a nodule"]
    hyps = ["frontal chest radiograph, lungs are clear", "an axial chest ct with a small nodule"]
    examples = [Example(f"c{n}.png", None, r, "caption") for n, r in enumerate(refs)]
    preds = [Prediction(f"c{n}.png", None, h) for n, h in enumerate(hyps)]
    m = score(examples, preds)["overall"]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    expected = [scorer.score(r, h) for r, h in zip(refs, hyps, strict=True)]
    assert m["rouge1"] == pytest.approx(sum(s["rouge1"].fmeasure for s in expected) / 2)
    assert m["rougeL"] == pytest.approx(sum(s["rougeL"].fmeasure for s in expected) / 2)
    assert m["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)


def test_per_modality_and_question_and_missing_predictions():
    examples = [
        Example("a.png", "Is there a fracture?", "yes", "closed", "CT"),
        Example("b.png", "Is there a fracture?", "no", "closed", "DX"),
        Example("b.png", "Which organ?", "the heart", "open", "DX"),
    ]
    preds = [Prediction("a.png", "Is there a fracture?", "yes", 0.9), Prediction("b.png", "Which organ?", "heart")]
    out = score(examples, preds)
    assert out["overall"]["missing"] == 1
    assert out["per_modality"]["CT"]["closed_accuracy"] == 1.0
    assert out["per_modality"]["DX"]["closed_accuracy"] == 0.0, "a missing prediction counts as wrong"
    assert out["per_question"]["Which organ?"]["open_recall"] == pytest.approx(1 / 2)
    assert out["overall"]["auroc"] is None, "one class: no AUROC"


def test_temperature_fit_undoes_overconfidence():
    # labels drawn from the true probability 0.7, predictions pushed to sigmoid(2 * logit(0.7))
    logit = math.log(0.7 / 0.3)
    p_over = 1 / (1 + math.exp(-2 * logit))
    ps = [p_over] * 100 + [1 - p_over] * 100
    ys = [1] * 70 + [0] * 30 + [0] * 70 + [1] * 30
    assert fit_temperature(ps, ys) == pytest.approx(2.0, rel=0.02)
    assert fit_temperature([0.5], [1]) == 1.0


def test_reliability_diagram_is_a_png(tmp_path):
    path = reliability_diagram([0.1, 0.4, 0.8, 0.9], [0, 1, 1, 1], tmp_path / "r.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_dataset_layouts_and_errors(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "x.png").write_bytes(b"png")
    (tmp_path / "y.jpg").write_bytes(b"jpg")
    entries = [
        {
            "img_name": "x.png",
            "question": "Is this an MRI?",
            "answer": "No",
            "answer_type": "CLOSED",
            "modality": "CT",
            "q_lang": "en",
        },
        {"img_name": "x.png", "question": "这是什么?", "answer": "肺", "answer_type": "OPEN", "q_lang": "zh"},
        {"image_name": "y.jpg", "question": "Where is the lesion?", "answer": "left lung", "answer_type": "OPEN"},
        {"image": "y.jpg", "question": None, "answer": "A chest radiograph.", "modality": "X-Ray"},
    ]
    (tmp_path / "dataset.json").write_text(json.dumps(entries))
    examples = load_dataset(tmp_path)
    assert [(e.image, e.kind, e.modality) for e in examples] == [
        ("x.png", "closed", "CT"),
        ("y.jpg", "open", "unknown"),
        ("y.jpg", "caption", "DX"),
    ]
    (tmp_path / "dataset.json").write_text(json.dumps([{"image": "missing.png", "question": "q?", "answer": "a"}]))
    with pytest.raises(DatasetError, match=r"missing\.png"):
        load_dataset(tmp_path)
    preds = tmp_path / "p.jsonl"
    preds.write_text('{"image": "x.png", "question": "q", "answer": "yes", "p_yes": 1.5}\n')
    with pytest.raises(DatasetError, match=r"p\.jsonl:1: p_yes"):
        load_predictions(preds)
