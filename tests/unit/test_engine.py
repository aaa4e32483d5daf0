"""The engine on a tiny SmolVLM built offline and loaded through AutoProcessor/AutoModel."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from integrations.ports import AnnotationRequest, ImageContext, Question
from integrations.vlm import prompts
from integrations.vlm.engine import EngineOptions, load_engine
from integrations.vlm.local import LocalAnnotator, resolve_checkpoint


def image(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (96, 80, 3), dtype=np.uint8))


def test_prefix_shared_scoring_equals_full_forward(tiny_model):
    engine = load_engine(tiny_model)
    ctx = prompts.context_text(ImageContext("DX", "CHEST", "PA"))
    questions = [
        prompts.closed_question(t)
        for t in ("Is there a pleural effusion?", "Is there a pneumothorax?", "Is the heart enlarged (cardiomegaly)?")
    ]
    shared, timings = engine.p_yes_shared(image(), ctx, questions)
    full = [engine.p_yes_full(image(), ctx, q) for q in questions]
    assert np.max(np.abs(np.array(shared) - np.array(full))) < 1e-4
    assert all(0.0 <= p <= 1.0 for p in shared)
    assert {"prefix_ms", "scoring_ms"} <= set(timings)


def test_answer_tokens_cover_case_and_spacing_variants(tiny_model):
    engine = load_engine(tiny_model)
    words = {
        engine.tokenizer.convert_tokens_to_string([engine.tokenizer.convert_ids_to_tokens(i)]) for i in engine.yes_ids
    }
    assert {w.strip() for w in words} >= {"yes", "Yes"}
    assert len(engine.no_ids) >= 2


def test_temperature_sharpens_or_flattens(tiny_model):
    engine = load_engine(tiny_model)
    q = [prompts.closed_question("Is there a pneumothorax?")]
    (p1,), _ = engine.p_yes_shared(image(1), "ctx", q)
    (p_hot,), _ = engine.p_yes_shared(image(1), "ctx", q, temperature=10.0)
    assert abs(p_hot - 0.5) < abs(p1 - 0.5) or p1 == pytest.approx(0.5)


def test_engine_is_loaded_once_per_process(tiny_model):
    assert load_engine(tiny_model) is load_engine(tiny_model)
    assert load_engine(tiny_model, options=EngineOptions(dtype="float32")) is not None


def test_local_annotator_answers_every_question(tiny_model, tmp_path):
    resolved = resolve_checkpoint(
        str(tiny_model), revision=None, cache_dir=tmp_path, offline_fallback=False, tiny_family="smolvlm"
    )
    assert resolved.offline_stand_in
    assert resolved.name == "tiny-random-smolvlm"
    annotator = LocalAnnotator.from_checkpoint(resolved)
    buf = io.BytesIO()
    image().save(buf, format="PNG")
    qs = (Question("a", "Is there a pleural effusion?"), Question("b", "What is shown?", kind="open", max_new_tokens=4))
    (result,) = annotator.annotate(
        [AnnotationRequest(buf.getvalue(), ImageContext("CR", "CHEST", "PA"), qs, caption_max_new_tokens=4)]
    )
    assert isinstance(result.caption, str)
    assert [a.question_id for a in result.answers] == ["a", "b"]
    assert result.answers[0].p_yes is not None
    assert result.answers[1].p_yes is None
    assert result.prompt_version == prompts.PROMPT_VERSION
    info = annotator.model_info
    assert info.offline_stand_in
    assert info.revision == resolved.revision
    assert info.backend == "local"


def test_unreachable_model_falls_back_to_tiny_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    resolved = resolve_checkpoint(
        "HuggingFaceTB/SmolVLM-256M-Instruct",
        revision=None,
        cache_dir=tmp_path,
        offline_fallback=True,
        tiny_family="smolvlm",
    )
    assert resolved.offline_stand_in
    assert "could not be loaded" in resolved.note
    assert "tiny" in resolved.note
    assert (tmp_path / "tiny-smolvlm" / "config.json").is_file()


def test_no_fallback_is_a_clear_error(tmp_path, monkeypatch):
    from integrations.errors import ConfigurationError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigurationError, match="cannot be loaded"):
        resolve_checkpoint(
            "nobody/no-such-model", revision=None, cache_dir=tmp_path, offline_fallback=False, tiny_family="smolvlm"
        )


def test_modality_aware_prompts():
    assert "CT slice" in prompts.context_text(ImageContext("CT", "CHEST"))
    assert "posteroanterior" in prompts.context_text(ImageContext("DX", "CHEST", "PA"))
    assert "of the brain" in prompts.context_text(ImageContext("MR", "BRAIN"))
    assert "patient head first, supine" in prompts.context_text(ImageContext("CT", "CHEST", "", "HFS"))
    assert "patient" not in prompts.context_text(ImageContext("CT", "CHEST", "", "XYZ"))
    assert prompts.PROMPT_VERSION.startswith("p1-")


def test_shared_scoring_reports_its_stages(tiny_model):
    engine = load_engine(tiny_model)
    image = Image.fromarray(np.full((64, 64, 3), 128, dtype=np.uint8))
    _, timings = engine.p_yes_shared(image, "A chest radiograph.", ["Is there an effusion?", "Is there a mass?"])
    assert set(timings) == {"preprocess_ms", "vision_ms", "prefix_ms", "scoring_ms"}
    assert timings["vision_ms"] > 0, "the vision encoder is timed on its own"
    assert all(v >= 0 for v in timings.values())


def test_generation_ends_at_stop_strings(tiny_model):
    from integrations.vlm.engine import VlmEngine, _cut

    assert _cut("a lung\nnodule", ("\n",)) == "a lung"
    assert _cut("no effusion. The heart", (".", "\n")) == "no effusion"
    image = Image.fromarray(np.full((64, 64, 3), 90, dtype=np.uint8))
    plain = VlmEngine(tiny_model).generate(image, "Describe.", max_new_tokens=24)
    assert "\n" not in plain
    common = sorted(set(plain.replace(" ", "")))[:1] or ["a"]
    stopped = VlmEngine(tiny_model, options=EngineOptions(stop_strings=("\n", *common))).generate(
        image, "Describe.", max_new_tokens=24
    )
    assert not set(common) & set(stopped)


def test_vision_encoder_forwards_are_counted_by_a_hook(tiny_model):
    from integrations.vlm.engine import VlmEngine

    engine = VlmEngine(tiny_model)
    assert engine.vision_tower is not None
    start = engine.vision_runs
    engine.generate(image(), "Describe.", max_new_tokens=2)
    engine.p_yes_shared(image(), "A chest radiograph.", ["Is there an effusion?", "Is there a mass?"])
    assert engine.vision_runs - start == 2  # one per call: the task-by-task path encodes the image per task
    engine.annotate_image(image(), caption_prompt="Describe.", closed_questions=["Is there a mass?"])
    assert engine.vision_runs - start == 3
