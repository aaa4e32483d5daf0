"""PEFT LoRA adapters on a base checkpoint (merged for inference), and the trust_remote_code allow-list."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from integrations.errors import ConfigurationError
from integrations.ports import AnnotationRequest, ImageContext, Question
from integrations.vlm.engine import EngineOptions, VlmEngine, remote_code_allowed
from integrations.vlm.local import LocalAnnotator, resolve_checkpoint


@pytest.fixture(scope="module")
def lora_adapter(tmp_path_factory, tiny_model):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(tiny_model)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # LoRA starts as a no-op (B = 0): make this one change the model
                param.normal_(0, 0.5)
    out = tmp_path_factory.mktemp("adapter") / "lora"
    peft_model.save_pretrained(out)
    return out


def png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_adapter_is_merged_and_recorded(tiny_model, lora_adapter):
    resolved = resolve_checkpoint(
        str(tiny_model), revision=None, cache_dir=tiny_model.parent, offline_fallback=False, tiny_family="smolvlm"
    )
    base = LocalAnnotator(VlmEngine(tiny_model), name=resolved.name, revision=resolved.revision)
    tuned = LocalAnnotator(
        VlmEngine(tiny_model, options=EngineOptions(adapter=str(lora_adapter))),
        name=resolved.name,
        revision=resolved.revision,
    )
    request = AnnotationRequest(png(), ImageContext("DX", "CHEST"), (Question("q", "Is there a mass?"),), caption=False)
    (a,) = base.annotate([request])
    (b,) = tuned.annotate([request])
    assert a.answers[0].p_yes != pytest.approx(b.answers[0].p_yes, abs=1e-6)
    assert tuned.model_info.options["adapter"] == str(lora_adapter)
    assert "adapter" not in base.model_info.options
    assert not any("lora" in name for name, _ in tuned.engine.model.named_parameters()), "merged, not wrapped"


def test_a_missing_adapter_is_a_clear_error(tiny_model, tmp_path):
    with pytest.raises(ConfigurationError, match="cannot be applied"):
        VlmEngine(tiny_model, options=EngineOptions(adapter=str(tmp_path / "no-adapter")))


def test_remote_code_only_for_allow_listed_checkpoints():
    assert not remote_code_allowed("org/custom-vlm", [])
    assert not remote_code_allowed("org/custom-vlm", ["org/other"])
    assert remote_code_allowed("org/custom-vlm", ["org/custom-vlm"])


def test_qido_paging_goes_on_past_short_pages():
    """A server that answers at most two results a page (but honours the offset) still gives all of
    them; paging ends at an empty page, or at a page that only repeats what came before."""
    from integrations.dicomweb import DicomWebStudySource

    answers = [{"0020000D": {"vr": "UI", "Value": [f"1.2.{i}"]}} for i in range(7)]
    web = DicomWebStudySource(name="w", url="http://127.0.0.1:9/dicom-web")
    asked: list[tuple[int, int]] = []

    def capped(limit: int, offset: int) -> list[dict]:
        asked.append((limit, offset))
        return answers[offset : offset + min(limit, 2)]

    assert web._paged("QIDO-RS", capped) == answers
    assert asked[-1] == (500, 7), "ended by an empty page"

    def ignores_offset(limit: int, offset: int) -> list[dict]:
        return answers[:2]

    assert web._paged("QIDO-RS", ignores_offset) == answers[:2]


def test_a_temperature_other_than_one_is_recorded(tiny_model):
    engine = VlmEngine(tiny_model)
    plain = LocalAnnotator(engine, name="m", revision="r")
    calibrated = LocalAnnotator(engine, name="m", revision="r", temperature=1.7)
    request = AnnotationRequest(png(), ImageContext("DX", "CHEST"), (Question("q", "Is there a mass?"),), caption=False)
    (a,) = plain.annotate([request])
    (b,) = calibrated.annotate([request])
    assert a.answers[0].p_yes != pytest.approx(b.answers[0].p_yes, abs=1e-6)
    assert calibrated.model_info.options["temperature"] == "1.7"
    assert "temperature" not in plain.model_info.options


def test_a_local_checkpoints_revision_follows_its_code_config_and_weights(tmp_path):
    def revision() -> str:
        return resolve_checkpoint(
            str(tmp_path), revision=None, cache_dir=tmp_path, offline_fallback=False, tiny_family="smolvlm"
        ).revision

    (tmp_path / "config.json").write_text('{"model_type": "x"}')
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 64)
    (tmp_path / "modeling_x.py").write_text("A = 1\n")
    first = revision()
    (tmp_path / "README.md").write_text("notes")
    assert revision() == first, "a README is not the model"
    (tmp_path / "modeling_x.py").write_text("A = 2\n")  # remote code runs: a change is a new revision
    second = revision()
    assert second != first
    (tmp_path / "model.safetensors").write_bytes(b"\1" * 64)
    third = revision()
    assert third != second
    (tmp_path / "config.json").write_text('{"model_type": "y"}')
    assert revision() != third
