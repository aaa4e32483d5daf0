"""Every supported architecture family, as a tiny random checkpoint built offline and loaded through the
same Auto-class path a real checkpoint takes: load, caption, closed questions (prefix-shared scoring equal
to a full forward), open questions. The captioner family (ViT + GPT-2) refuses questions clearly."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from integrations.errors import UnsupportedTask
from integrations.ports import AnnotationRequest, ImageContext, Question
from integrations.vlm import prompts
from integrations.vlm.local import LocalAnnotator, resolve_checkpoint
from integrations.vlm.tiny import STANDS_IN_FOR, build_tiny, families

pytestmark = pytest.mark.slow
CHAT_FAMILIES = [f for f in families() if f != "ved"]


@pytest.fixture(scope="module", params=families())
def family_model(request, tmp_path_factory):
    folder = build_tiny(request.param, tmp_path_factory.mktemp("fam") / request.param)
    resolved = resolve_checkpoint(
        str(folder), revision=None, cache_dir=folder.parent, offline_fallback=False, tiny_family=request.param
    )
    return request.param, LocalAnnotator.from_checkpoint(resolved)


def png(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (96, 80, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_every_family_stands_in_for_a_real_checkpoint():
    assert set(families()) == set(STANDS_IN_FOR)
    assert {
        "smolvlm",
        "idefics3",
        "llava",
        "llava_next",
        "qwen2_vl",
        "qwen2_5_vl",
        "gemma3",
        "paligemma",
        "ved",
    } <= set(families())


def test_loads_and_captions(family_model):
    family, annotator = family_model
    assert annotator.model_info.options["family"] in (family, "vision-encoder-decoder", "smolvlm")
    (result,) = annotator.annotate(
        [AnnotationRequest(png(), ImageContext("DX", "CHEST", "PA"), caption_max_new_tokens=5)]
    )
    assert isinstance(result.caption, str)


def test_closed_and_open_questions(family_model):
    family, annotator = family_model
    questions = (
        Question("a", "Is there a pleural effusion?"),
        Question("b", "Is there a pneumothorax?"),
        Question("c", "What is shown?", kind="open", max_new_tokens=3),
    )
    request = AnnotationRequest(png(1), ImageContext("CT", "CHEST"), questions, caption=False)
    if family == "ved":
        with pytest.raises(UnsupportedTask, match="captions only"):
            annotator.annotate([request])
        return
    (result,) = annotator.annotate([request])
    assert [a.question_id for a in result.answers] == ["a", "b", "c"]
    assert all(0.0 <= a.p_yes <= 1.0 for a in result.answers[:2])
    assert result.answers[2].p_yes is None


@pytest.mark.parametrize("family", CHAT_FAMILIES)
def test_prefix_shared_scoring_matches_a_full_forward(family, tmp_path):
    from integrations.vlm.engine import VlmEngine

    engine = VlmEngine(build_tiny(family, tmp_path / family))
    image = Image.open(io.BytesIO(png(2))).convert("RGB")
    context = prompts.context_text(ImageContext("DX", "CHEST", "AP"))
    questions = [
        prompts.closed_question(q) for q in ("Is there a mass?", "Is the heart enlarged?", "Are there support devices?")
    ]
    shared, timings = engine.p_yes_shared(image, context, questions)
    full = [engine.p_yes_full(image, context, q) for q in questions]
    assert max(abs(a - b) for a, b in zip(shared, full, strict=True)) <= 1e-4
    if not engine.prefix_lm:
        assert timings["vision_ms"] > 0, f"{family}: the vision encoder is timed apart from the prefix"


@pytest.mark.parametrize("family", families())
def test_batched_generation_equals_one_image_at_a_time(family, tmp_path):
    from integrations.vlm.engine import VlmEngine

    engine = VlmEngine(build_tiny(family, tmp_path / family))
    rng = np.random.default_rng(5)
    images = [
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((96, 80), (64, 64), (120, 50))
    ]
    texts = ["Describe.", "This is a CT slice of the chest. Describe the findings in one or two sentences.", "What?"]
    single = [engine.generate(i, t, max_new_tokens=5, min_new_tokens=5) for i, t in zip(images, texts, strict=True)]
    assert engine.generate_batch(images, texts, max_new_tokens=5, min_new_tokens=5) == single


def test_a_question_prompt_overrides_its_text(family_model):
    family, annotator = family_model
    if family == "ved":
        return
    plain = Question("q", "Is there a pleural effusion?")
    worded = Question("q", "Is there a pleural effusion?", prompt="Is fluid layering in the pleural space?")
    request = AnnotationRequest(png(4), ImageContext("DX", "CHEST"), (plain,), caption=False)
    (a,) = annotator.annotate([request])
    (b,) = annotator.annotate([AnnotationRequest(png(4), ImageContext("DX", "CHEST"), (worded,), caption=False)])
    assert a.answers[0].p_yes != b.answers[0].p_yes


@pytest.mark.parametrize("family", CHAT_FAMILIES)
def test_closed_questions_of_several_images_in_one_call_equal_one_at_a_time(family, tmp_path):
    """Different images, contexts of different lengths (left padding) and different question counts."""
    from integrations.vlm.engine import VlmEngine

    engine = VlmEngine(build_tiny(family, tmp_path / family))
    images = [Image.open(io.BytesIO(png(seed))).convert("RGB") for seed in (3, 4, 5)]
    contexts = [
        prompts.context_text(ImageContext("DX", "CHEST", "PA")),
        prompts.context_text(ImageContext("CT", "", "", "HFS")),
        prompts.context_text(ImageContext("MR", "BRAIN", "", "HEAD FIRST SUPINE")),
    ]
    questions = [
        [prompts.closed_question(q) for q in ("Is there a mass?", "Is the heart enlarged?")],
        [prompts.closed_question("Is there a nodule?")],
        [prompts.closed_question(q) for q in ("Is there hemorrhage?", "Is there a mass?", "Are the ventricles large?")],
    ]
    batched = engine.p_yes_shared_batch(list(zip(images, contexts, questions, strict=True)))
    for (probs, timings), image, context, qs in zip(batched, images, contexts, questions, strict=True):
        alone, _ = engine.p_yes_shared(image, context, qs)
        assert max(abs(a - b) for a, b in zip(probs, alone, strict=True)) <= 1e-4
        assert "scoring_ms" in timings


def test_one_vision_encoding_per_image_agrees_with_the_batched_task_by_task_path(family_model, monkeypatch):
    """LocalAnnotator asks each image's caption and questions with one vision encoding (`annotate_images`);
    with `encode_once` off it takes the batched task-by-task path. Both give the same answers."""
    family, annotator = family_model
    engine = annotator.engine
    questions = (
        ()
        if family == "ved"
        else (
            Question("a", "Is there a pleural effusion?"),
            Question("o", "What is shown?", kind="open", max_new_tokens=4),
            Question("b", "Is there a pneumothorax?"),
        )
    )
    requests = [
        AnnotationRequest(png(6), ImageContext("DX", "CHEST", "PA"), questions, caption_max_new_tokens=6),
        AnnotationRequest(png(7), ImageContext("CT", "CHEST"), questions, caption_max_new_tokens=6),
    ]
    assert annotator.encodes_once
    start = engine.vision_runs
    once = annotator.annotate(requests)
    assert engine.vision_runs - start == len(requests)
    monkeypatch.setattr(engine, "encode_once", False)
    batched = annotator.annotate(requests)
    for a, b in zip(once, batched, strict=True):
        assert a.caption == b.caption
        assert [x.text for x in a.answers] == [x.text for x in b.answers]
        assert all(
            x.p_yes == y.p_yes or abs(x.p_yes - y.p_yes) <= 1e-4 for x, y in zip(a.answers, b.answers, strict=True)
        )
