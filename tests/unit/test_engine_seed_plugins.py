"""The seed models' architectures as engine plugins (integrations/vlm/plugins/): each built tiny and random
offline in its published layout, installed as a `nightread.engines` entry point and loaded the way a real
checkpoint is (settings → resolve_checkpoint → load_engine → the entry point). The same contract as the
stock families: caption, closed and open questions, prefix-shared P(yes) equal to a full forward, a batch
of images equal to one at a time; and one vision forward per image for all of an image's tasks."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from integrations.errors import ConfigurationError
from integrations.ports import AnnotationRequest, ImageContext, Question
from integrations.vlm import prompts
from integrations.vlm.engine import EngineOptions, engine_plugins, load_engine
from integrations.vlm.local import LocalAnnotator, resolve_checkpoint
from integrations.vlm.plugins import PLUGIN_BUILDERS, STANDS_IN_FOR, build_tiny_plugin

CAPTION_ONLY = {"cnn_captioner"}  # its own tests: tests/unit/test_engine_cnn_captioner.py
PLUGINS = sorted(set(PLUGIN_BUILDERS) - CAPTION_ONLY)  # the VLM plugins: captions and questions


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("seed")
    return {name: build_tiny_plugin(name, root / name) for name in PLUGINS}


@pytest.fixture(params=PLUGINS)
def plugin(request: pytest.FixtureRequest, checkpoints: dict[str, Path]) -> tuple[str, Path]:
    return request.param, checkpoints[request.param]


def engine_of(name: str, folder: Path, **options: object):  # type: ignore[no-untyped-def]
    return load_engine(folder, options=EngineOptions(engine=name, **options))  # type: ignore[arg-type]


def picture(seed: int, size: tuple[int, int] = (96, 80)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8))


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    picture(seed).save(buf, format="PNG")
    return buf.getvalue()


def test_every_plugin_is_an_installed_entry_point_with_a_builder():
    assert set(PLUGINS) == {"tinyllava", "biomedclip_llama", "med_moe", "medvint"}
    assert set(PLUGIN_BUILDERS) == set(PLUGINS) | CAPTION_ONLY
    assert set(PLUGIN_BUILDERS) <= set(engine_plugins()), "pip install -e . registers pyproject's nightread.engines"
    assert set(STANDS_IN_FOR) == set(PLUGIN_BUILDERS)
    with pytest.raises(ValueError, match="unknown seed plugin"):
        build_tiny_plugin("nope", Path("/nonexistent"))


def test_settings_select_the_plugin_and_it_annotates(plugin, make_settings):
    """Caption, closed and open questions through the same path a real checkpoint takes."""
    from flows.wiring.runtime import build_annotator

    name, folder = plugin
    annotator, note = build_annotator(make_settings(inference={"engine": name, "model": str(folder)}))
    questions = (
        Question("a", "Is there a pleural effusion?"),
        Question("b", "Is there a pneumothorax?"),
        Question("c", "What is shown?", kind="open", max_new_tokens=3),
    )
    (result,) = annotator.annotate(
        [AnnotationRequest(png(1), ImageContext("CT", "CHEST"), questions, caption_max_new_tokens=4)]
    )
    assert isinstance(result.caption, str)
    assert [a.question_id for a in result.answers] == ["a", "b", "c"]
    assert all(0.0 <= a.p_yes <= 1.0 for a in result.answers[:2])
    assert result.answers[2].p_yes is None
    assert isinstance(result.answers[2].text, str)
    assert {"vision_ms", "prefix_ms", "scoring_ms"} <= set(result.timings_ms)
    info = annotator.model_info
    assert info.options["family"] == name
    assert info.offline_stand_in
    assert info.name == f"tiny-random-{name}"
    assert note == ""


def test_offline_a_plugins_stand_in_is_its_own_tiny_build(make_settings, tmp_path):
    """A hub id that cannot be reached, offline fallback on: the stand-in is the plugin's own architecture
    (a SmolVLM could not load in it), built once, labelled as a stand-in."""
    from flows.wiring.runtime import build_annotator

    settings = make_settings(
        data_dir=tmp_path,
        inference={
            "engine": "tinyllava",
            "model": "nobody/no-such-sigphi-med",
            "offline_fallback": True,
            "hub_timeout_s": 1,
        },
    )
    annotator, note = build_annotator(settings)
    assert annotator.model_info.options["family"] == "tinyllava"
    assert annotator.model_info.name == "tiny-random-tinyllava"
    assert annotator.model_info.offline_stand_in
    assert "tinyllava" in note
    assert "its answers mean nothing" in note
    (result,) = annotator.annotate(
        [AnnotationRequest(png(2), ImageContext("DX", "CHEST"), (Question("a", "Is there a mass?"),), caption=False)]
    )
    assert 0.0 <= (result.answers[0].p_yes or 0.0) <= 1.0
    assert (tmp_path / "models" / "tiny-tinyllava" / "nightread_tiny.json").is_file()


def test_prefix_shared_scoring_matches_a_full_forward(plugin):
    name, folder = plugin
    engine = engine_of(name, folder)
    image = picture(2)
    context = prompts.context_text(ImageContext("DX", "CHEST", "AP"))
    questions = [
        prompts.closed_question(q) for q in ("Is there a mass?", "Is the heart enlarged?", "Are there support devices?")
    ]
    shared, timings = engine.p_yes_shared(image, context, questions)
    full = [engine.p_yes_full(image, context, q) for q in questions]
    assert max(abs(a - b) for a, b in zip(shared, full, strict=True)) <= 1e-4
    assert set(timings) == {"preprocess_ms", "vision_ms", "prefix_ms", "scoring_ms"}
    hot, _ = engine.p_yes_shared(image, context, questions[:1], temperature=10.0)
    assert abs(hot[0] - 0.5) <= abs(shared[0] - 0.5)


def test_a_batch_of_images_equals_one_at_a_time(plugin):
    """Different image sizes, contexts of different lengths (left padding), different question counts."""
    name, folder = plugin
    engine = engine_of(name, folder)
    images = [picture(3, (96, 80)), picture(4, (64, 64)), picture(5, (120, 50))]
    texts = ["Describe.", "This is a CT slice of the chest. Describe the findings in one or two sentences.", "What?"]
    single = [engine.generate(i, t, max_new_tokens=5, min_new_tokens=5) for i, t in zip(images, texts, strict=True)]
    assert engine.generate_batch(images, texts, max_new_tokens=5, min_new_tokens=5) == single
    contexts = [
        prompts.context_text(ImageContext("DX", "CHEST", "PA")),
        prompts.context_text(ImageContext("CT", "", "", "HFS")),
        prompts.context_text(ImageContext("MR", "BRAIN")),
    ]
    questions = [
        ["Is there a mass?", "Is the heart enlarged?"],
        ["Is there a nodule?"],
        ["Is there hemorrhage?", "Is there a mass?", "Are the ventricles large?"],
    ]
    batched = engine.p_yes_shared_batch(list(zip(images, contexts, questions, strict=True)))
    for (probs, timings), image, context, qs in zip(batched, images, contexts, questions, strict=True):
        alone, _ = engine.p_yes_shared(image, context, qs)
        assert max(abs(a - b) for a, b in zip(probs, alone, strict=True)) <= 1e-4
        assert "scoring_ms" in timings


def test_the_vision_tower_runs_once_per_image(plugin):
    """Caption, closed and open questions of two images: one vision forward of the two, reused after."""
    name, folder = plugin
    engine = engine_of(name, folder)
    resolved = resolve_checkpoint(
        str(folder), revision=None, cache_dir=folder.parent, offline_fallback=False, tiny_family="smolvlm"
    )
    annotator = LocalAnnotator(engine, name=resolved.name, revision=resolved.revision)
    calls: list[int] = []
    handle = engine.vision_tower.register_forward_hook(lambda _m, args, _out: calls.append(int(args[0].shape[0])))
    try:
        questions = (
            Question("a", "Is there a mass?"),
            Question("b", "Is there an effusion?"),
            Question("c", "What is shown?", kind="open", max_new_tokens=2),
            Question("d", "Where?", kind="open", max_new_tokens=2),
        )
        # pixels no other test uses: the features of an image are cached by its pixels
        requests = [AnnotationRequest(png(seed), ImageContext("DX", "CHEST"), questions) for seed in (901, 902)]
        results = annotator.annotate(requests)
    finally:
        handle.remove()
    assert calls == [2], f"{name}: vision forwards (batch sizes) {calls}"
    assert all(r.caption is not None and len(r.answers) == 4 for r in results)


def test_saved_weights_have_the_published_key_names(plugin):
    from importlib import import_module

    from safetensors import safe_open

    name, folder = plugin
    module = import_module(f"integrations.vlm.plugins.{name}")
    with safe_open(str(folder / "model.safetensors"), "pt") as weights:
        keys = set(weights.keys())
    assert set(module.PUBLISHED_KEYS) <= keys, sorted(set(module.PUBLISHED_KEYS) - keys)


def test_a_checkpoint_of_another_architecture_is_a_clear_error(checkpoints):
    with pytest.raises(ConfigurationError, match="not a MedVInT checkpoint"):
        load_engine(checkpoints["tinyllava"], options=EngineOptions(engine="medvint"))
    with pytest.raises(ConfigurationError, match="local checkpoint folder"):
        load_engine("org/no-such-model", options=EngineOptions(engine="tinyllava"))


# --- BiomedCLIP + LLaMA-3: the LoRA adapter ----------------------------------------------------------------


def test_the_lora_adapter_changes_answers_and_is_recorded(checkpoints, tmp_path):
    folder = checkpoints["biomedclip_llama"]
    bare = tmp_path / "no-adapter"
    shutil.copytree(folder, bare, ignore=shutil.ignore_patterns("adapter_*"))
    request = AnnotationRequest(
        png(3), ImageContext("DX", "CHEST"), (Question("q", "Is there a mass?"),), caption=False
    )

    def annotator(path: Path, **options: object) -> LocalAnnotator:
        resolved = resolve_checkpoint(
            str(path), revision=None, cache_dir=path.parent, offline_fallback=False, tiny_family="smolvlm"
        )
        return LocalAnnotator.from_checkpoint(resolved, options=EngineOptions(engine="biomedclip_llama", **options))  # type: ignore[arg-type]

    tuned, base = annotator(folder), annotator(bare)
    (a,) = tuned.annotate([request])
    (b,) = base.annotate([request])
    assert a.answers[0].p_yes != pytest.approx(b.answers[0].p_yes, abs=1e-6)
    assert tuned.model_info.options["adapter"] == str(folder)
    assert "adapter" not in base.model_info.options
    assert tuned.model_info.revision != base.model_info.revision, "the adapter's files are in the revision"
    assert not any("lora" in n for n, _ in tuned.engine.language_model.named_parameters()), "merged"
    # the same adapter from elsewhere (NIGHTREAD_INFERENCE__ADAPTER) on the bare checkpoint: same answers
    external = annotator(bare, adapter=str(folder))
    (c,) = external.annotate([request])
    assert c.answers[0].p_yes == pytest.approx(a.answers[0].p_yes, abs=1e-5)
    assert external.model_info.options["adapter"] == str(folder)


def test_an_active_adapter_answers_as_the_merged_one(checkpoints, tmp_path):
    folder = checkpoints["biomedclip_llama"]
    active = tmp_path / "active"
    shutil.copytree(folder, active)
    config = json.loads((active / "config.json").read_text())
    (active / "config.json").write_text(json.dumps({**config, "lora_merge": False}))
    merged_engine, active_engine = engine_of("biomedclip_llama", folder), engine_of("biomedclip_llama", active)
    assert any("lora_A" in n for n, _ in active_engine.language_model.named_parameters())
    qs = ["Is there a mass?", "Is there a nodule?"]
    merged, _ = merged_engine.p_yes_shared(picture(6), "ctx", qs)
    unmerged, _ = active_engine.p_yes_shared(picture(6), "ctx", qs)
    assert max(abs(x - y) for x, y in zip(merged, unmerged, strict=True)) <= 1e-5


def test_the_image_tower_has_open_clips_biomedclip_layout():
    """Key names and shapes equal to open_clip's own TimmModel for BiomedCLIP's vision config (full size,
    built on the meta device: no memory, no download)."""
    import torch
    from open_clip.timm_model import TimmModel

    from integrations.vlm.plugins.biomedclip_llama import BIOMEDCLIP_OPEN_CLIP_CONFIG, OpenClipTimmVisual

    cfg = BIOMEDCLIP_OPEN_CLIP_CONFIG["model_cfg"]
    with torch.device("meta"):
        ours = OpenClipTimmVisual(cfg)
        theirs = TimmModel("vit_base_patch16_224", embed_dim=512, image_size=224, pool="", proj="linear")
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {
        k: tuple(v.shape) for k, v in theirs.state_dict().items()
    }


# --- Med-MoE: routing ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("k", "meta"), [(1, True), (2, False)])
def test_moe_routing_equals_a_token_by_token_loop(k, meta):
    """Top-1 (Med-MoE: + the meta expert; gate not renormalised) and top-2 (renormalised) routing."""
    import torch
    from torch import nn

    from integrations.vlm.plugins.med_moe import MoE

    torch.manual_seed(0)
    expert = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    moe = MoE(expert, 8, num_experts=4, k=k, gate_bias=meta, meta=meta)
    for p in moe.deepspeed_moe.parameters():
        nn.init.normal_(p, 0, 0.5)
    x = torch.randn(2, 5, 8)
    expected = []
    for token in x.reshape(-1, 8):
        gates = torch.softmax(moe.deepspeed_moe.gate(token[None])[0], -1)
        top = torch.topk(gates, k)
        weights = top.values / top.values.sum() if k == 2 else top.values
        out = sum(
            w * moe.deepspeed_moe.experts.deepspeed_experts[int(e)](token)
            for w, e in zip(weights, top.indices, strict=True)
        )
        expected.append(out + (expert(token) if meta else 0))
    assert torch.allclose(moe(x), torch.stack(expected).reshape(2, 5, 8), atol=1e-6)
    keys = set(moe.state_dict())
    assert {"deepspeed_moe.gate.wg.weight", "deepspeed_moe.experts.deepspeed_experts.3.2.weight"} <= keys
    assert ("meta_moe.0.weight" in keys) is meta
    assert ("deepspeed_moe.gate.wg.bias" in keys) is meta


# --- MedVInT-TD: the released PEFT key names --------------------------------------------------------------------


def test_medvint_reads_both_peft_key_namings_and_merges_the_lora(checkpoints):
    from integrations.vlm.plugins.medvint import to_current_peft_keys, to_published_peft_keys

    old = {
        "llamacasual.base_model.model.model.layers.0.self_attn.q_proj.weight": 1,
        "llamacasual.base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": 2,
        "llamacasual.base_model.model.model.layers.0.self_attn.k_proj.weight": 3,
        "fc_l1.weight": 4,
    }
    current = to_current_peft_keys(old, ("q_proj", "v_proj"))
    assert set(current) == {
        "llamacasual.base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight",
        "llamacasual.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
        "llamacasual.base_model.model.model.layers.0.self_attn.k_proj.weight",
        "fc_l1.weight",
    }
    assert to_current_peft_keys(current, ("q_proj", "v_proj")) == current
    assert to_published_peft_keys(current) == old
    engine = engine_of("medvint", checkpoints["medvint"])
    assert not any("lora" in n for n, _ in engine.language_model.named_parameters()), "merged at load"


def test_a_vision_tower_saved_by_transformers_5_loads_too(checkpoints, tmp_path):
    """The published checkpoints (transformers 4) name CLIP/SigLIP weights `…vision_model.*`; transformers 5
    writes them without that level. Both load."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "flat"
    shutil.copytree(checkpoints["tinyllava"], folder)
    state = load_file(str(folder / "model.safetensors"))
    prefix = "vision_tower._vision_tower."
    flat = {k.replace(f"{prefix}vision_model.", prefix): v for k, v in state.items()}
    assert flat != state
    save_file(flat, str(folder / "model.safetensors"))
    context, questions = "ctx", ["Is there a mass?"]
    published, _ = engine_of("tinyllava", checkpoints["tinyllava"]).p_yes_shared(picture(7), context, questions)
    flattened, _ = engine_of("tinyllava", folder).p_yes_shared(picture(7), context, questions)
    assert flattened == pytest.approx(published, abs=1e-6)
