"""Validation metrics over labeled examples and predictions (pure functions; no model, no database).

Conventions (documented in the README):
- closed questions: accuracy of the normalised answer (yes/no) against the reference;
- open questions: token recall (LLaVA-Med's "open-set recall": the share of the reference's tokens
  found in the prediction) and token F1 (SQuAD-style, with token counts); tokens are lower-cased
  words with punctuation removed;
- captions: ROUGE-1 and ROUGE-L F-measure (rouge-score, Porter stemmer) averaged over captions, and
  corpus BLEU (sacrebleu `corpus_bleu`, not an average of sentence BLEU);
- P(yes) of closed questions: AUROC (scikit-learn; None with one class) and expected calibration
  error over 10 equal-width bins (sum over bins of |fraction yes - mean P(yes)| weighted by the
  bin's share of examples); a reliability diagram plots the same bins.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

YES = {"yes", "y", "true", "1", "present", "positive"}
NO = {"no", "n", "false", "0", "absent", "negative"}
METRICS = ("closed_accuracy", "open_recall", "open_f1", "rouge1", "rougeL", "bleu", "auroc", "ece")


class DatasetError(ValueError):
    """A labeled set or predictions file that cannot be read; the message names the file and entry."""


@dataclass(frozen=True)
class Example:
    """One labeled item: a closed or open question about an image, or (question None) its caption."""

    image: str
    question: str | None
    answer: str
    kind: str  # closed | open | caption
    modality: str = "unknown"


@dataclass(frozen=True)
class Prediction:
    image: str
    question: str | None
    answer: str
    p_yes: float | None = None


def normalise_closed(answer: str) -> str | None:
    a = answer.strip().lower().strip(string.punctuation + " ")
    first = a.split()[0] if a.split() else ""
    if a in YES or first in YES:
        return "yes"
    if a in NO or first in NO:
        return "no"
    return None


def tokens(text: str) -> list[str]:
    return re.sub(rf"[{re.escape(string.punctuation)}]", " ", text.lower()).split()


def token_recall(reference: str, prediction: str) -> float:
    ref, pred = tokens(reference), set(tokens(prediction))
    return sum(1 for t in ref if t in pred) / len(ref) if ref else 0.0


def token_f1(reference: str, prediction: str) -> float:
    ref, pred = Counter(tokens(reference)), Counter(tokens(prediction))
    common = sum((ref & pred).values())
    if common == 0:
        return 0.0
    precision, recall = common / sum(pred.values()), common / sum(ref.values())
    return 2 * precision * recall / (precision + recall)


def expected_calibration_error(p: Sequence[float], y: Sequence[int], bins: int = 10) -> float:
    if not p:
        return float("nan")
    total = 0.0
    for _lo, _hi, members in _bins(p, y, bins):
        if members:
            conf = sum(pp for pp, _ in members) / len(members)
            acc = sum(yy for _, yy in members) / len(members)
            total += abs(acc - conf) * len(members) / len(p)
    return total


def _bins(p: Sequence[float], y: Sequence[int], bins: int) -> list[tuple[float, float, list[tuple[float, int]]]]:
    out: list[tuple[float, float, list[tuple[float, int]]]] = [(i / bins, (i + 1) / bins, []) for i in range(bins)]
    for pp, yy in zip(p, y, strict=True):
        index = min(int(pp * bins), bins - 1)
        out[index][2].append((pp, yy))
    return out


def auroc(p: Sequence[float], y: Sequence[int]) -> float | None:
    if len(set(y)) < 2:
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(list(y), list(p)))


def fit_temperature(p: Sequence[float], y: Sequence[int]) -> float:
    """The temperature T minimising the negative log-likelihood of sigmoid(logit(p) / T)."""
    if len(p) < 2 or len(set(y)) < 2:
        return 1.0
    from scipy.optimize import minimize_scalar

    logits = [math.log(min(max(pp, 1e-6), 1 - 1e-6) / (1 - min(max(pp, 1e-6), 1 - 1e-6))) for pp in p]

    def nll(log_t: float) -> float:
        t = math.exp(log_t)
        total = 0.0
        for z, yy in zip(logits, y, strict=True):
            q = 1.0 / (1.0 + math.exp(-z / t))
            q = min(max(q, 1e-12), 1 - 1e-12)
            total -= yy * math.log(q) + (1 - yy) * math.log(1 - q)
        return total / len(logits)

    res = minimize_scalar(nll, bounds=(math.log(0.05), math.log(20.0)), method="bounded")
    return float(math.exp(res.x))


def _caption_scores(pairs: Sequence[tuple[str, str]]) -> dict[str, float | None]:
    if not pairs:
        return {"rouge1": None, "rougeL": None, "bleu": None}
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    r1 = rl = 0.0
    for ref, pred in pairs:
        s = scorer.score(ref, pred)  # score(target, prediction)
        r1 += s["rouge1"].fmeasure
        rl += s["rougeL"].fmeasure
    bleu = sacrebleu.corpus_bleu([pred for _, pred in pairs], [[ref for ref, _ in pairs]]).score
    return {"rouge1": r1 / len(pairs), "rougeL": rl / len(pairs), "bleu": float(bleu)}


def _key(image: str, question: str | None) -> tuple[str, str]:
    return (image, (question or "").strip().lower())


def score(examples: Sequence[Example], predictions: Sequence[Prediction]) -> dict[str, Any]:
    """Every metric overall, per modality and per question. Examples without a prediction count as
    wrong (and are counted in `missing`)."""
    groups: dict[str, list[tuple[Example, Prediction | None]]] = defaultdict(list)
    for ex, pred in _matched(examples, predictions):
        groups["overall"].append((ex, pred))
        groups[f"modality:{ex.modality}"].append((ex, pred))
        if ex.question is not None:
            groups[f"question:{ex.question}"].append((ex, pred))
    out: dict[str, Any] = {"overall": _metrics(groups.pop("overall", []))}
    out["per_modality"] = {
        k.split(":", 1)[1]: _metrics(v) for k, v in sorted(groups.items()) if k.startswith("modality:")
    }
    out["per_question"] = {
        k.split(":", 1)[1]: _metrics(v) for k, v in sorted(groups.items()) if k.startswith("question:")
    }
    return out


def _metrics(items: Sequence[tuple[Example, Prediction | None]]) -> dict[str, Any]:
    closed = [(e, p) for e, p in items if e.kind == "closed"]
    open_ = [(e, p) for e, p in items if e.kind == "open"]
    captions = [(e, p) for e, p in items if e.kind == "caption"]
    correct = sum(1 for e, p in closed if p is not None and normalise_closed(p.answer) == normalise_closed(e.answer))
    ps, ys = _scored(closed)
    recall = [token_recall(e.answer, p.answer if p else "") for e, p in open_]
    f1 = [token_f1(e.answer, p.answer if p else "") for e, p in open_]
    return {
        "n": len(items),
        "n_closed": len(closed),
        "n_open": len(open_),
        "n_captions": len(captions),
        "missing": sum(1 for _, p in items if p is None),
        "closed_accuracy": correct / len(closed) if closed else None,
        "open_recall": sum(recall) / len(recall) if recall else None,
        "open_f1": sum(f1) / len(f1) if f1 else None,
        **_caption_scores([(e.answer, p.answer if p else "") for e, p in captions]),
        "auroc": auroc(ps, ys),
        "ece": expected_calibration_error(ps, ys) if ps else None,
    }


def reliability_diagram(p: Sequence[float], y: Sequence[int], path: Path, *, title: str = "") -> Path:
    """A PNG of the 10-bin reliability diagram (fraction yes against mean P(yes) per bin)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    xs, accs, counts = [], [], []
    for lo, hi, members in _bins(p, y, 10):
        if members:
            xs.append(sum(pp for pp, _ in members) / len(members))
            accs.append(sum(yy for _, yy in members) / len(members))
            counts.append(len(members))
            ax.bar((lo + hi) / 2, accs[-1], width=0.09, alpha=0.35, color="tab:blue")
    ax.plot(xs, accs, marker="o", color="tab:blue", label="model")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean P(yes) in bin")
    ax.set_ylabel("fraction answered yes by the reference")
    ax.set_title(title or f"reliability (ECE {expected_calibration_error(p, y):.3f}, n={len(p)})")
    ax.legend(loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# --- files -------------------------------------------------------------------------------------------


def _modality(entry: dict[str, Any]) -> str:
    raw = str(entry.get("modality") or entry.get("image_modality") or "").strip()
    if not raw:
        return "unknown"
    return {"x-ray": "DX", "xray": "DX", "mri": "MR", "ct": "CT"}.get(raw.lower(), raw.upper())


def load_dataset(folder: Path) -> list[Example]:
    """A labeled folder in the VQA-RAD / SLAKE JSON layout: a JSON list (the only .json file, or
    `dataset.json`, `test.json`) of entries with the image file (`image_name` / `img_name` / `image`),
    `question` (null or absent: a reference caption), `answer`, `answer_type` (closed / open),
    optional `modality`."""
    if not folder.is_dir():
        raise DatasetError(f"{folder}: not a folder")
    candidates = [folder / n for n in ("dataset.json", "test.json") if (folder / n).exists()]
    if not candidates:
        candidates = sorted(folder.glob("*.json"))
    if len(candidates) != 1:
        raise DatasetError(f"{folder}: expected one JSON file (or dataset.json), found {len(candidates)}")
    try:
        entries = json.loads(candidates[0].read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{candidates[0]}: not valid JSON ({exc})") from exc
    if not isinstance(entries, list):
        raise DatasetError(f"{candidates[0]}: expected a JSON list of entries")
    out: list[Example] = []
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise DatasetError(f"{candidates[0]}: entry {n} is not an object")
        if entry.get("q_lang", "en") != "en":
            continue  # SLAKE is bilingual; the English half is used
        image = entry.get("image_name") or entry.get("img_name") or entry.get("image")
        answer = entry.get("answer")
        if not image or answer is None:
            raise DatasetError(f"{candidates[0]}: entry {n} needs an image file and an answer")
        if not (folder / str(image)).exists() and not (folder / "imgs" / str(image)).exists():
            raise DatasetError(f"{candidates[0]}: entry {n}: image {image!r} is not in the folder")
        question = entry.get("question")
        kind = str(entry.get("answer_type") or "").lower()
        if question in (None, ""):
            kind, question = "caption", None
        elif kind not in ("closed", "open"):
            kind = "closed" if normalise_closed(str(answer)) is not None else "open"
        out.append(Example(str(image), question, str(answer), kind, _modality(entry)))
    if not out:
        raise DatasetError(f"{candidates[0]}: no entries")
    return out


def image_path(folder: Path, image: str) -> Path:
    direct = folder / image
    return direct if direct.exists() else folder / "imgs" / image


def load_predictions(path: Path) -> list[Prediction]:
    """JSON lines: `image`, `question` (null for a caption), `answer`, optional `p_yes`."""
    out: list[Prediction] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DatasetError(f"{path}: {exc}") from exc
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}:{n}: not JSON ({exc.msg})") from exc
        if not isinstance(obj, dict) or "image" not in obj or "answer" not in obj:
            raise DatasetError(f"{path}:{n}: needs image and answer")
        p = obj.get("p_yes")
        if p is not None and not (isinstance(p, int | float) and 0.0 <= float(p) <= 1.0):
            raise DatasetError(f"{path}:{n}: p_yes must be a number between 0 and 1")
        out.append(
            Prediction(str(obj["image"]), obj.get("question"), str(obj["answer"]), None if p is None else float(p))
        )
    return out


def write_predictions(path: Path, predictions: Iterable[Prediction]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for p in predictions:
            record: dict[str, Any] = {"image": p.image, "question": p.question, "answer": p.answer}
            if p.p_yes is not None:
                record["p_yes"] = p.p_yes
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")


def _matched(examples: Sequence[Example], predictions: Sequence[Prediction]) -> list[tuple[Example, Prediction | None]]:
    """Each example with its prediction (by image and question, case-insensitively), or None."""
    by_key = {_key(p.image, p.question): p for p in predictions}
    return [(e, by_key.get(_key(e.image, e.question))) for e in examples]


def _scored(items: Sequence[tuple[Example, Prediction | None]]) -> tuple[list[float], list[int]]:
    """(P(yes), reference is yes) of the closed examples that have a yes/no reference and a P(yes)."""
    ps, ys = [], []
    for e, p in items:
        ref = normalise_closed(e.answer)
        if e.kind == "closed" and p is not None and p.p_yes is not None and ref is not None:
            ps.append(p.p_yes)
            ys.append(1 if ref == "yes" else 0)
    return ps, ys


def closed_pairs(examples: Sequence[Example], predictions: Sequence[Prediction]) -> tuple[list[float], list[int]]:
    return _scored(_matched(examples, predictions))
