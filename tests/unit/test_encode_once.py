"""One vision encoding per image: `annotate_images` answers an image's caption, closed and open questions
with the vision encoder run once, and gives what the same work task by task gives (identical text for
greedy decoding, P(yes) within 1e-4), for every tiny family. Vision forwards are counted by the engine's
hook on the encoder module."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from integrations.errors import UnsupportedTask
from integrations.ports import AnnotationRequest, ImageContext, Question
from integrations.vlm import prompts
from integrations.vlm.engine import EngineOptions, ImageAnnotation, ImageTask, VlmEngine
from integrations.vlm.local import LocalAnnotator, image_task
from integrations.vlm.tiny import build_tiny, families

pytestmark = pytest.mark.slow
CHAT_FAMILIES = [f for f in families() if f != "ved"]
CONTEXTS = [ImageContext("DX", "CHEST", "PA"), ImageContext("CT", "", "", "HFS"), ImageContext("MR", "BRAIN")]


@pytest.fixture(scope="module")
def engine_of(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], VlmEngine]:
    built: dict[str, VlmEngine] = {}

    def get(family: str) -> VlmEngine:
        if family not in built:
            built[family] = VlmEngine(build_tiny(family, tmp_path_factory.mktemp("once") / family))
        return built[family]

    return get


def images() -> list[Image.Image]:
    rng = np.random.default_rng(7)
    return [
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((96, 80), (64, 64), (120, 50))
    ]


def tasks_for(family: str) -> list[ImageTask]:
    """Three images: everything; closed questions only; a caption and open questions only."""
    ims = images()
    if family == "ved":
        return [ImageTask(im, prompts.caption_prompt(c), 10) for im, c in zip(ims, CONTEXTS, strict=True)]

    def closed(*texts: str) -> tuple[str, ...]:
        return tuple(prompts.closed_question(t) for t in texts)

    def opened(ctx: ImageContext, *texts: str) -> tuple[tuple[str, int], ...]:
        return tuple((prompts.open_question(ctx, t), n) for t, n in zip(texts, (12, 6), strict=False))

    a, b, c = CONTEXTS
    return [
        ImageTask(
            ims[0],
            prompts.caption_prompt(a),
            16,
            prompts.closed_prefix(a),
            closed("Is there a pleural effusion?", "Is there a pneumothorax?", "Is the heart enlarged?"),
            opened(a, "What is the most important finding?"),
        ),
        ImageTask(ims[1], None, 16, prompts.closed_prefix(b), closed("Is there a lung nodule?")),
        ImageTask(ims[2], prompts.caption_prompt(c), 8, "", (), opened(c, "In which plane?", "What is shown?")),
    ]


def task_by_task_runs(engine: VlmEngine, task: ImageTask) -> int:
    """Vision forwards of the task-by-task path: one per generate and per p_yes_shared (per question for a
    prefix-LM, which scores each question in a full forward)."""
    closed = (len(task.closed_questions) if engine.prefix_lm else 1) if task.closed_questions else 0
    return (task.caption_prompt is not None) + closed + len(task.open_questions)


def assert_same(reference: list[ImageAnnotation], encoded: list[ImageAnnotation]) -> None:
    assert len(reference) == len(encoded)
    for ref, got in zip(reference, encoded, strict=True):
        assert got.caption == ref.caption
        assert got.answers == ref.answers
        assert len(got.p_yes) == len(ref.p_yes)
        assert max((abs(x - y) for x, y in zip(ref.p_yes, got.p_yes, strict=True)), default=0.0) <= 1e-4


@pytest.mark.parametrize("family", families())
def test_one_vision_encoding_per_image_gives_the_task_by_task_answers(family, engine_of):
    engine = engine_of(family)
    assert engine.encode_once, f"{family}: {engine.encode_once_reason}"
    tasks = tasks_for(family)
    start = engine.vision_runs
    reference = engine.annotate_images(tasks, encode_once=False)
    task_by_task = engine.vision_runs - start
    assert task_by_task == sum(task_by_task_runs(engine, t) for t in tasks)
    start = engine.vision_runs
    encoded = engine.annotate_images(tasks)
    assert engine.vision_runs - start == len(tasks), "one vision encoding per image"
    assert_same(reference, encoded)
    if family != "ved":
        assert all(len(r.p_yes) == len(t.closed_questions) for r, t in zip(encoded, tasks, strict=True))
        assert [len(r.answers) for r in encoded] == [len(t.open_questions) for t in tasks]
        assert encoded[1].caption is None
        assert encoded[0].caption is not None


@pytest.mark.parametrize("family", ["smolvlm", "llava_next", "qwen2_vl", "gemma3", "idefics", "paligemma"])
def test_answers_written_to_their_token_caps_are_identical(family, engine_of):
    """Every caption and answer forced to its cap (no early stop): long greedy continuations still agree."""
    engine = engine_of(family)
    tasks = [replace(t, caption_max_new_tokens=24) for t in tasks_for(family)]
    reference = engine.annotate_images(tasks, encode_once=False, min_new_tokens=24)
    encoded = engine.annotate_images(tasks, min_new_tokens=24)
    assert_same(reference, encoded)
    if family != "paligemma":  # the tiny PaliGemma writes special tokens only, decoded to nothing
        assert any(len(r.caption or "") > 10 for r in encoded)


@pytest.mark.parametrize("family", [f for f in CHAT_FAMILIES if f != "paligemma"])
def test_caption_and_open_answers_in_one_generate_call_equal_separate_calls(family, engine_of, monkeypatch):
    """The GPU path: the captions and open answers of all images as rows of one generate call, each row its
    image's cached prefix (left-padded), padding, then its prompt's own tokens, give what separate calls
    give. Gemma 3's sliding-window layers keep one call per row."""
    engine = engine_of(family)
    tasks = tasks_for(family)
    monkeypatch.setattr(engine, "batch_generations", False)
    separate = engine.annotate_images(tasks)
    monkeypatch.setattr(engine, "batch_generations", True)
    calls: list[int] = []
    generate = engine.model.generate

    def counted(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return generate(*args, **kwargs)

    monkeypatch.setattr(engine.model, "generate", counted)
    together = engine.annotate_images(tasks)
    assert_same(separate, together)
    rows = sum((t.caption_prompt is not None) + len(t.open_questions) for t in tasks)
    assert calls == ([1] * rows if family == "gemma3" else [rows])


@pytest.mark.parametrize("family", CHAT_FAMILIES)
def test_a_batch_of_images_equals_one_image_at_a_time(family, engine_of):
    engine = engine_of(family)
    tasks = tasks_for(family)
    start = engine.vision_runs
    batch = engine.annotate_images(tasks, temperature=2.0)
    assert engine.vision_runs - start == len(tasks)
    alone = [engine.annotate_images([t], temperature=2.0)[0] for t in tasks]
    assert_same(alone, batch)


def test_annotate_image_is_the_one_image_form(engine_of):
    engine = engine_of("smolvlm")
    task = tasks_for("smolvlm")[0]
    one = engine.annotate_image(
        task.image,
        caption_prompt=task.caption_prompt,
        caption_max_new_tokens=task.caption_max_new_tokens,
        closed_context=task.closed_context,
        closed_questions=task.closed_questions,
        open_questions=task.open_questions,
    )
    assert_same(engine.annotate_images([task]), [one])
    assert {"preprocess_ms", "vision_ms", "prefix_ms", "generate_ms", "caption_ms", "scoring_ms"} <= set(one.timings_ms)
    assert engine.annotate_image(task.image) == ImageAnnotation(None, [], [], {})


def test_prompts_that_do_not_share_the_image_go_task_by_task(engine_of, monkeypatch):
    engine = engine_of("llava")
    tasks = tasks_for("llava")
    reference = engine.annotate_images(tasks, encode_once=False)
    monkeypatch.setattr(engine, "_shared_prefix_length", lambda *_, **__: None)
    start = engine.vision_runs
    assert_same(reference, engine.annotate_images(tasks))
    assert engine.vision_runs - start == sum(task_by_task_runs(engine, t) for t in tasks)


def test_a_family_that_cannot_says_so_and_goes_task_by_task(engine_of, monkeypatch):
    engine = engine_of("qwen2_vl")
    monkeypatch.setattr(engine, "encode_once", False)
    tasks = tasks_for("qwen2_vl")
    start = engine.vision_runs
    engine.annotate_images(tasks)
    assert engine.vision_runs - start == sum(task_by_task_runs(engine, t) for t in tasks)


def test_every_family_says_how_it_encodes_once(engine_of):
    for family in families():
        engine = engine_of(family)
        assert engine.encode_once_reason, family
    assert "features" in engine_of("paligemma").encode_once_reason
    assert "KV cache" in engine_of("llava").encode_once_reason


def test_a_captioner_refuses_questions(engine_of):
    engine = engine_of("ved")
    image = images()[0]
    with pytest.raises(UnsupportedTask, match="captions only"):
        engine.annotate_image(image, caption_prompt="Describe.", closed_questions=["Is there a mass?"])
    with pytest.raises(UnsupportedTask, match="captions only"):
        engine.annotate_image(image, open_questions=[("What is shown?", 4)])


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (72, 90, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def chest_requests() -> list[AnnotationRequest]:
    questions = (
        Question("effusion", "Is there a pleural effusion?"),
        Question("impression", "What is the most important finding?", kind="open", max_new_tokens=6),
        Question("ptx", "Is there a pneumothorax?", prompt="Is air in the pleural space?"),
    )
    return [
        AnnotationRequest(png(1), ImageContext("DX", "CHEST", "PA"), questions, caption_max_new_tokens=8),
        AnnotationRequest(png(2), ImageContext("CR", "CHEST"), questions[:1], caption=False),
        AnnotationRequest(png(3), ImageContext("CT", "CHEST"), questions[1:2], caption_max_new_tokens=5),
    ]


def test_local_annotator_encodes_each_image_once_and_answers_as_before(tiny_model, monkeypatch):
    engine = VlmEngine(tiny_model)
    annotator = LocalAnnotator(engine, name="tiny", revision="r")
    assert annotator.encodes_once
    requests = chest_requests()
    start = engine.vision_runs
    encoded = annotator.annotate(requests)
    assert engine.vision_runs - start == len(requests)
    monkeypatch.setattr(engine, "encode_once", False)
    assert not annotator.encodes_once
    before = annotator.annotate(requests)  # the batched task-by-task path
    for new, old, request in zip(encoded, before, requests, strict=True):
        assert new.caption == old.caption
        assert (new.caption is None) == (not request.caption)
        assert [a.question_id for a in new.answers] == [q.id for q in request.questions]
        for a, b in zip(new.answers, old.answers, strict=True):
            assert a.text == b.text
            assert (a.p_yes is None) == (b.p_yes is None)
            assert a.p_yes is None or abs(a.p_yes - b.p_yes) <= 1e-4
    assert {"vision_ms", "scoring_ms", "caption_ms"} <= set(encoded[0].timings_ms)


class TupleEngine:
    """A plugin-style engine whose annotate_images returns plain tuples."""

    family = "tuple"
    captions_only = False
    dtype = "n/a"
    options = EngineOptions()

    def __init__(self, encode_once: bool = True) -> None:
        self.encode_once = encode_once
        self.calls: list[str] = []

    def generate(self, image, prompt, *, max_new_tokens, min_new_tokens=0):
        self.calls.append("generate")
        return "generated"

    def p_yes_shared(self, image, context, questions, *, temperature=1.0):
        self.calls.append("p_yes_shared")
        return [0.25 for _ in questions], {}

    def annotate_images(self, tasks, *, temperature=1.0):
        self.calls.append("annotate_images")
        return [
            (
                "a caption" if t.caption_prompt else None,
                [0.75] * len(t.closed_questions),
                ["open"] * len(t.open_questions),
                {},
            )
            for t in tasks
        ]


def test_local_annotator_uses_a_plugins_annotate_images_unless_it_declines():
    requests = chest_requests()[:1]
    engine = TupleEngine()
    (result,) = LocalAnnotator(engine, name="t", revision="r").annotate(requests)
    assert engine.calls == ["annotate_images"]
    assert result.caption == "a caption"
    assert [(a.question_id, a.text, a.p_yes) for a in result.answers] == [
        ("effusion", "yes", 0.75),
        ("impression", "open", None),
        ("ptx", "yes", 0.75),
    ]
    declining = TupleEngine(encode_once=False)
    (result,) = LocalAnnotator(declining, name="t", revision="r").annotate(requests)
    assert "annotate_images" not in declining.calls
    assert [a.p_yes for a in result.answers] == [0.25, None, 0.25]


def test_image_task_uses_the_task_by_task_prompts():
    request = chest_requests()[0]
    task = image_task(request, "image")
    assert task.caption_prompt == prompts.caption_prompt(request.context)
    assert task.caption_max_new_tokens == 8
    assert task.closed_context == prompts.closed_prefix(request.context)
    assert task.closed_questions == (
        prompts.closed_question("Is there a pleural effusion?"),
        prompts.closed_question("Is air in the pleural space?"),
    )
    assert task.open_questions == ((prompts.open_question(request.context, "What is the most important finding?"), 6),)
    assert image_task(replace(request, caption=False), "image").caption_prompt is None
