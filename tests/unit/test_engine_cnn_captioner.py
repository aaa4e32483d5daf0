"""The seed study's captioning baseline as the engine plugin `cnn_captioner` (DenseNet-121 + transformer decoder):
built tiny and random offline, installed as a `nightread.engines` entry point and loaded the way a real
checkpoint is. It captions; any question is a clear UnsupportedTask; a batch equals one image at a time; the
weights carry torchvision's densenet121 names."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from integrations.errors import ConfigurationError, UnsupportedTask
from integrations.ports import AnnotationRequest, ImageContext, Question
from integrations.vlm.engine import EngineOptions, engine_plugins, load_engine
from integrations.vlm.local import LocalAnnotator, resolve_checkpoint
from integrations.vlm.plugins import PLUGIN_BUILDERS, STANDS_IN_FOR, build_tiny_plugin
from integrations.vlm.plugins.cnn_captioner import (
    DENSENET121,
    FAMILY,
    PUBLISHED_KEYS,
    DenseNetEncoder,
    densenet_encoder_state,
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_plugin(FAMILY, tmp_path_factory.mktemp("cnn") / FAMILY)


def engine_of(folder: Path, **options: object):  # type: ignore[no-untyped-def]
    return load_engine(folder, options=EngineOptions(engine=FAMILY, **options))  # type: ignore[arg-type]


def picture(seed: int, size: tuple[int, int] = (80, 96)) -> Image.Image:
    """Images that differ in colour and texture (noise alone looks alike to a random CNN)."""
    rng = np.random.default_rng(seed)
    _, x = np.mgrid[: size[0], : size[1]]
    wave = 80 * np.sin(x / (4 + seed))[..., None]
    pixels = rng.integers(0, 255, 3) + wave + rng.normal(0, 20, (*size, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def png(seed: int, size: tuple[int, int] = (80, 96)) -> bytes:
    buf = io.BytesIO()
    picture(seed, size).save(buf, format="PNG")
    return buf.getvalue()


def annotator_of(folder: Path, **options: object) -> LocalAnnotator:
    resolved = resolve_checkpoint(
        str(folder), revision=None, cache_dir=folder.parent, offline_fallback=False, tiny_family="smolvlm"
    )
    return LocalAnnotator.from_checkpoint(resolved, options=EngineOptions(engine=FAMILY, **options))  # type: ignore[arg-type]


def test_it_is_an_installed_entry_point_with_a_builder():
    assert FAMILY in engine_plugins(), "pip install -e . registers pyproject's nightread.engines"
    assert FAMILY in PLUGIN_BUILDERS
    assert "DenseNet-121" in STANDS_IN_FOR[FAMILY]


def test_settings_select_it_and_it_captions(folder, make_settings):
    from flows.wiring.runtime import build_annotator

    annotator, note = build_annotator(make_settings(inference={"engine": FAMILY, "model": str(folder)}))
    (result,) = annotator.annotate([AnnotationRequest(png(1), ImageContext("DX", "CHEST"), caption_max_new_tokens=8)])
    assert isinstance(result.caption, str)
    assert result.caption
    assert result.answers == []
    assert {"vision_ms", "caption_ms"} <= set(result.timings_ms)
    info = annotator.model_info
    assert info.options["family"] == FAMILY
    assert info.name == f"tiny-random-{FAMILY}"
    assert info.offline_stand_in
    assert note == ""


@pytest.mark.parametrize(
    "questions",
    [
        (Question("a", "Is there a pleural effusion?"),),
        (Question("c", "What is shown?", kind="open", max_new_tokens=3),),
    ],
    ids=["closed", "open"],
)
def test_questions_are_a_clear_unsupported_task(folder, questions):
    annotator = annotator_of(folder)
    request = AnnotationRequest(png(2), ImageContext("CT", "CHEST"), questions, caption=False)
    with pytest.raises(UnsupportedTask, match=f"{FAMILY} writes captions only; it cannot answer questions"):
        annotator.annotate([request])
    with pytest.raises(UnsupportedTask, match="captions only"):
        engine_of(folder).p_yes_shared(picture(2), "ctx", ["Is there a mass?"])


def test_a_batch_of_images_equals_one_at_a_time(folder):
    engine = engine_of(folder)
    images = [picture(3, (80, 96)), picture(4, (64, 64)), picture(5, (120, 50))]
    prompts = ["Describe.", "Describe the findings.", "?"]
    single = [engine.generate(i, p, max_new_tokens=8) for i, p in zip(images, prompts, strict=True)]
    assert engine.generate_batch(images, prompts, max_new_tokens=8) == single
    assert len(set(single)) > 1, "captions depend on the image"
    forced = [engine.generate(i, "", max_new_tokens=6, min_new_tokens=6) for i in images]
    assert engine.generate_batch(images, [""] * 3, max_new_tokens=6, min_new_tokens=6) == forced
    # the annotator: several requests in one call (one batch per token cap) equal one request at a time
    annotator = annotator_of(folder)
    requests = [AnnotationRequest(png(s), ImageContext("DX"), caption_max_new_tokens=8) for s in (6, 7, 8)]
    together = [r.caption for r in annotator.annotate(requests)]
    assert together == [annotator.annotate([r])[0].caption for r in requests]


def test_stop_strings_end_the_caption(folder):
    caption = engine_of(folder).generate(picture(9), "", max_new_tokens=16)
    stop = next((ch for ch in caption[len(caption) // 2 :] if not ch.isspace()), None)
    assert stop is not None, caption
    cut = engine_of(folder, stop_strings=(stop,)).generate(picture(9), "", max_new_tokens=16)
    assert cut == caption.split(stop, 1)[0].strip()
    assert annotator_of(folder, stop_strings=(stop,)).model_info.options["stop_strings"] == json.dumps([stop])


def test_saved_weights_have_the_published_key_names(folder):
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as weights:
        keys = set(weights.keys())
    assert set(PUBLISHED_KEYS) <= keys, sorted(set(PUBLISHED_KEYS) - keys)
    assert not any(k.startswith("encoder.classifier.") for k in keys)


def test_the_encoder_has_torchvisions_densenet121_layout():
    """Key names and shapes equal to torchvision's densenet121().features (full size, on the meta device), and
    a torchvision / CheXNet state dict (prefixes, old-style names) converts onto them."""
    import torch
    from torchvision.models import densenet121

    with torch.device("meta"):
        ours = DenseNetEncoder(DENSENET121)
        theirs = densenet121(weights=None)
    expected = {f"encoder.{k}": tuple(v.shape) for k, v in theirs.state_dict().items() if k.startswith("features.")}
    assert {f"encoder.{k}": tuple(v.shape) for k, v in ours.state_dict().items()} == expected
    assert ours.channels == 1024
    state = theirs.state_dict()
    chexnet = {
        f"module.densenet121.{k}".replace("norm1.", "norm.1.").replace("conv2.", "conv.2."): v for k, v in state.items()
    }
    assert set(densenet_encoder_state(chexnet)) == set(expected)
    assert set(densenet_encoder_state(state)) == set(expected)


def test_a_checkpoint_of_another_architecture_is_a_clear_error(folder, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "tinyllava"}))
    with pytest.raises(ConfigurationError, match="not a CNN captioner checkpoint"):
        load_engine(other, options=EngineOptions(engine=FAMILY))
    with pytest.raises(ConfigurationError, match="local checkpoint folder"):
        load_engine("org/no-such-model", options=EngineOptions(engine=FAMILY))
