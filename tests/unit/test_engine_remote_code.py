"""Checkpoints with their own modelling code (MoonDream2's layout) through the engine plugin `remote_code`: a
tiny one built offline (config.json with auto_map, its two .py files, weights, tokenizer) loads through
transformers' trust_remote_code path only when allow-listed, answers caption, closed and open questions
through the Engine protocol, and is refused with a clear error otherwise. The code really runs from the
checkpoint folder (copied into a dynamic-module cache of this test's own)."""

from __future__ import annotations

import inspect
import io
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from integrations.errors import ConfigurationError
from integrations.ports import AnnotationRequest, ImageContext, Question
from integrations.vlm import prompts
from integrations.vlm.engine import EngineOptions, engine_plugins, load_engine
from integrations.vlm.plugins.remote_code import ENGINE, TINY_FILES, build_tiny_remote_code

MODELING = "modeling_tinymoondream.py"


@pytest.fixture(scope="module")
def modules_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """transformers' dynamic-module cache (HF_MODULES_CACHE) in a temporary folder for this module's tests."""
    import transformers.dynamic_module_utils as dynamic

    cache = tmp_path_factory.mktemp("hf_modules")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_MODULES_CACHE", str(cache))
        mp.setattr(dynamic, "HF_MODULES_CACHE", str(cache))
        mp.setattr(sys, "path", list(sys.path))  # the loader appends the cache to sys.path
        yield cache


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory, modules_cache: Path) -> Path:
    return build_tiny_remote_code(tmp_path_factory.mktemp("remote") / "tinymoondream")


def trusted(folder: Path, **options: object):  # type: ignore[no-untyped-def]
    return load_engine(folder, options=EngineOptions(engine=ENGINE, trust_remote_code=True, **options))  # type: ignore[arg-type]


def picture(seed: int, size: tuple[int, int] = (80, 96)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8))


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    picture(seed).save(buf, format="PNG")
    return buf.getvalue()


QUESTIONS = (
    Question("a", "Is there a pleural effusion?"),
    Question("b", "Is there a pneumothorax?"),
    Question("c", "What is shown?", kind="open", max_new_tokens=3),
)


def test_the_checkpoint_is_laid_out_like_moondream2(folder):
    import json

    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "tinymoondream"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_tinymoondream.TinyMoondreamConfig",
        "AutoModelForCausalLM": "modeling_tinymoondream.TinyMoondreamForCausalLM",
    }
    assert all((folder / name).is_file() for name in TINY_FILES)
    assert (folder / "model.safetensors").is_file()
    assert (folder / "tokenizer.json").is_file()
    assert ENGINE in engine_plugins()


def test_allow_listed_it_loads_and_answers_caption_closed_and_open_questions(folder, make_settings):
    from flows.wiring.runtime import build_annotator

    settings = make_settings(inference={"engine": ENGINE, "model": str(folder), "trust_remote_code_for": [str(folder)]})
    annotator, note = build_annotator(settings)
    (result,) = annotator.annotate(
        [AnnotationRequest(png(1), ImageContext("CT", "CHEST"), QUESTIONS, caption_max_new_tokens=4)]
    )
    assert isinstance(result.caption, str)
    assert [a.question_id for a in result.answers] == ["a", "b", "c"]
    assert all(0.0 <= a.p_yes <= 1.0 for a in result.answers[:2])
    assert result.answers[2].p_yes is None
    assert isinstance(result.answers[2].text, str)
    assert annotator.model_info.options["family"] == "tinymoondream"
    assert annotator.model_info.offline_stand_in
    assert note == ""


def test_not_allow_listed_it_is_refused_and_its_code_never_runs(folder, make_settings, modules_cache, tmp_path):
    from flows.wiring.runtime import build_annotator

    refused = tmp_path / "refused-moondream"
    shutil.copytree(folder, refused)
    for allow in ([], ["org/another-model"]):
        settings = make_settings(inference={"engine": ENGINE, "model": str(refused), "trust_remote_code_for": allow})
        with pytest.raises(ConfigurationError, match=r"runs its own code .*NIGHTREAD_INFERENCE__TRUST_REMOTE_CODE_FOR"):
            build_annotator(settings)
    assert not list(modules_cache.rglob("refused*")), "nothing of the refused checkpoint was copied or imported"


def test_the_modelling_code_runs_from_the_checkpoint_folder(folder, modules_cache, tmp_path):
    engine = trusted(folder)
    cls = type(engine.model)
    assert cls.__module__.startswith("transformers_modules."), cls.__module__
    source = Path(inspect.getfile(cls))
    assert source.is_relative_to(modules_cache)
    assert source.read_bytes() == (folder / MODELING).read_bytes()
    # a checkpoint whose file says something else: that is what runs
    edited = tmp_path / "edited-moondream"
    shutil.copytree(folder, edited)
    with (edited / MODELING).open("a") as fh:
        fh.write("\nNIGHTREAD_TEST_MARK = 'from the edited checkpoint'\n")
    module = sys.modules[type(trusted(edited).model).__module__]
    assert module.NIGHTREAD_TEST_MARK == "from the edited checkpoint"
    assert not hasattr(sys.modules[cls.__module__], "NIGHTREAD_TEST_MARK")


def test_prefix_shared_scoring_equals_the_models_own_forward(folder):
    """P(yes) from the shared prefix cache equals a full forward of the engine's sequence, and the remote model's
    own MoonDream interface (input_embeds + forward) on the same prompt."""
    import torch

    engine = trusted(folder)
    image = picture(2)
    context = prompts.context_text(ImageContext("DX", "CHEST", "AP"))
    questions = [prompts.closed_question(q) for q in ("Is there a mass?", "Is the heart enlarged?")]
    shared, timings = engine.p_yes_shared(image, context, questions)
    full = [engine.p_yes_full(image, context, q) for q in questions]
    assert max(abs(a - b) for a, b in zip(shared, full, strict=True)) <= 1e-4
    assert {"vision_ms", "prefix_ms", "scoring_ms"} <= set(timings)
    model, tokenizer = engine.model, engine.tokenizer
    own = []
    with torch.inference_mode():
        embeds = model.encode_image(image)
        for q in questions:
            prompt = model.config.prompt_template.replace("{text}", f"{context}\n{q}")
            logits = model(inputs_embeds=model.input_embeds(prompt, embeds, tokenizer)).logits[:, -1]
            own.append(engine._p_yes(logits, 1.0)[0])
    assert max(abs(a - b) for a, b in zip(shared, own, strict=True)) <= 1e-4
    answer = model.answer_question(embeds, "What is shown?", tokenizer, max_new_tokens=3)
    assert isinstance(answer, str)


def test_a_batch_of_images_equals_one_at_a_time(folder):
    engine = trusted(folder)
    images = [picture(3, (96, 80)), picture(4, (64, 64)), picture(5, (120, 50))]
    texts = ["Describe.", "Describe the findings in one or two sentences.", "What?"]
    single = [engine.generate(i, t, max_new_tokens=5, min_new_tokens=5) for i, t in zip(images, texts, strict=True)]
    assert engine.generate_batch(images, texts, max_new_tokens=5, min_new_tokens=5) == single
    items = [(images[0], "ctx one", ["Is there a mass?"]), (images[1], "a longer context here", ["Is it?", "No?"])]
    for (probs, _), (image, context, qs) in zip(engine.p_yes_shared_batch(items), items, strict=True):
        alone, _ = engine.p_yes_shared(image, context, qs)
        assert max(abs(a - b) for a, b in zip(probs, alone, strict=True)) <= 1e-4


def test_a_checkpoint_without_remote_code_is_a_clear_error(tiny_model):
    with pytest.raises(ConfigurationError, match=r"no auto_map\.AutoModelForCausalLM"):
        load_engine(tiny_model, options=EngineOptions(engine=ENGINE, trust_remote_code=True))
