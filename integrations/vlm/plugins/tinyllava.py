"""TinyLLaVA (TinyLLaVA_Factory) and SigPhi-Med: a SigLIP vision tower, a 2-layer GELU MLP connector and a
Phi-2 decoder.

Published layout (TinyLLaVA_Factory's `TinyLlavaForConditionalGeneration`, e.g. the hub checkpoint
`tinyllava/TinyLLaVA-Phi-2-SigLIP-3.1B`), read here as it is, no conversion:

    config.json         model_type "tinyllava"; text_config (a PhiConfig dict, model_type "phi"),
                        vision_config (SiglipVisionConfig, model_type "siglip_vision_model"),
                        connector_type "mlp2x_gelu", vision_feature_layer -2,
                        vision_feature_select_strategy "patch", image_aspect_ratio
    model.safetensors   (or sharded, with model.safetensors.index.json)
        language_model.model.embed_tokens.weight, language_model.model.layers.N.self_attn.{q,k,v}_proj,
        language_model.model.layers.N.self_attn.dense, language_model.model.layers.N.mlp.fc{1,2},
        language_model.model.final_layernorm, language_model.lm_head.{weight,bias}   (PhiForCausalLM)
        vision_tower._vision_tower.vision_model.embeddings.patch_embedding.weight, ….encoder.layers.N…,
        vision_tower._vision_tower.vision_model.post_layernorm, ….head…   (SiglipVisionModel)
        connector._connector.0.{weight,bias}, connector._connector.2.{weight,bias}   (Linear, GELU, Linear)
    tokenizer files     Phi-2's (CodeGen BPE)

Image features are the vision tower's hidden states at `vision_feature_layer`; the "patch" strategy drops
the first token, as TinyLLaVA_Factory's VisionTower does (for SigLIP too). The conversation is the Factory's
"phi" template. Other towers and decoders of the Factory (CLIP, TinyLlama, StableLM, Qwen2…) load the same
way; an optional `nightread` block in config.json overrides the prompt template and image processing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from integrations.errors import ConfigurationError
from integrations.vlm.engine import EngineOptions
from integrations.vlm.plugins import composed
from integrations.vlm.plugins.composed import (
    CLIP_MEAN,
    CLIP_STD,
    HALF,
    ComposedVlmEngine,
    ImageSpec,
    LoadedArchitecture,
    PromptSpec,
    VlmParts,
)

FAMILY = "tinyllava"
STANDS_IN_FOR = "tinyllava/TinyLLaVA-Phi-2-SigLIP-3.1B (SigPhi-Med: same architecture)"
# TinyLLaVA_Factory's "phi" template (tinyllava/data/template/phi_template.py), as used at inference
PHI_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
PHI_TEMPLATE = PHI_SYSTEM + " USER: <image>\n{text} ASSISTANT:"
# a few keys of the published state dict (checked against the tiny build's saved weights)
PUBLISHED_KEYS = (
    "language_model.model.embed_tokens.weight",
    "language_model.model.layers.0.self_attn.q_proj.weight",
    "language_model.model.layers.0.self_attn.dense.weight",
    "language_model.model.layers.0.mlp.fc1.weight",
    "language_model.model.final_layernorm.weight",
    "language_model.lm_head.weight",
    "vision_tower._vision_tower.vision_model.embeddings.patch_embedding.weight",
    "vision_tower._vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight",
    "vision_tower._vision_tower.vision_model.post_layernorm.weight",
    "connector._connector.0.weight",
    "connector._connector.2.weight",
)


class TinyLlavaVisionTower(nn.Module):  # type: ignore[misc]
    """TinyLLaVA_Factory's VisionTower: the transformers vision model under `_vision_tower`."""

    def __init__(self, model: Any, *, feature_layer: int, select: str) -> None:
        super().__init__()
        self._vision_tower = model
        self.feature_layer = feature_layer
        self.select = select

    def features(self, pixel_values: Any) -> Any:
        hidden = self._vision_tower(pixel_values, output_hidden_states=True).hidden_states[self.feature_layer]
        return hidden[:, 1:] if self.select == "patch" else hidden


class TinyLlavaConnector(nn.Module):  # type: ignore[misc]
    """TinyLLaVA_Factory's MLP connector (`mlp{N}x_gelu`) or linear connector, under `_connector`."""

    def __init__(self, connector_type: str, vision_hidden: int, hidden: int) -> None:
        super().__init__()
        if connector_type == "linear":
            self._connector: Any = nn.Linear(vision_hidden, hidden)
            return
        depth = _mlp_depth(connector_type)
        layers: list[Any] = [nn.Linear(vision_hidden, hidden)]
        for _ in range(1, depth):
            layers += [nn.GELU(), nn.Linear(hidden, hidden)]
        self._connector = nn.Sequential(*layers)

    def forward(self, x: Any) -> Any:
        return self._connector(x)


def _mlp_depth(connector_type: str) -> int:
    import re

    match = re.fullmatch(r"mlp(\d+)x_gelu", connector_type)
    if match is None:
        raise ConfigurationError(f"config.json: connector_type {connector_type!r} is not linear or mlpNx_gelu")
    return int(match.group(1))


class TinyLlavaForConditionalGeneration(nn.Module):  # type: ignore[misc]
    """The published module tree: `language_model`, `vision_tower`, `connector`."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        text = composed.require(config, "text_config", dict)
        vision = composed.require(config, "vision_config", dict)
        self.language_model = composed.causal_lm(text)
        self.vision_tower = TinyLlavaVisionTower(
            composed.vision_model(vision, where="vision_config"),
            feature_layer=int(config.get("vision_feature_layer", -2)),
            select=str(config.get("vision_feature_select_strategy", "patch")),
        )
        self.connector = TinyLlavaConnector(
            str(config.get("connector_type", "mlp2x_gelu")),
            int(composed.require(vision, "hidden_size", int, where="vision_config")),
            int(composed.require(text, "hidden_size", int, where="text_config")),
        )

    def image_tokens(self, pixel_values: Any) -> Any:
        return self.connector(self.vision_tower.features(pixel_values))

    def renames(self) -> list[tuple[str, str]]:
        return composed.vision_renames("vision_tower._vision_tower.", self.vision_tower._vision_tower)


def _image_spec(config: dict[str, Any]) -> ImageSpec:
    override = config.get("nightread", {}).get("image_processor")
    if override is not None:
        return composed.image_spec(override, where="config.json nightread")
    vision = config["vision_config"]
    siglip = "siglip" in str(vision.get("model_type", ""))
    return ImageSpec(
        size=int(vision.get("image_size", 384)),
        mean=HALF if siglip else CLIP_MEAN,
        std=HALF if siglip else CLIP_STD,
        resize="pad" if config.get("image_aspect_ratio") == "pad" else "squash",
    )


def _prompt(config: dict[str, Any]) -> PromptSpec:
    template = config.get("nightread", {}).get("prompt_template", PHI_TEMPLATE)
    return PromptSpec(template=str(template), stop_tokens=("<|endoftext|>", "</s>"))


def build(folder: Path, config: dict[str, Any], options: EngineOptions) -> LoadedArchitecture:
    if config.get("model_type") != "tinyllava":
        raise ConfigurationError(f"{folder}/config.json is not a TinyLLaVA checkpoint (model_type 'tinyllava')")
    with composed.skip_init():
        root = TinyLlavaForConditionalGeneration(config)
    composed.require_complete(composed.load_weights(root, composed.read_state_dict(folder), renames=root.renames()))
    parts = VlmParts(
        root=root,
        language_model=root.language_model,
        vision_tower=root.vision_tower._vision_tower,
        encode=root.image_tokens,
    )
    return LoadedArchitecture(parts=parts, prompt=_prompt(config), image=_image_spec(config))


def load(checkpoint: str, options: EngineOptions) -> ComposedVlmEngine:
    """The `nightread.engines` entry point `tinyllava`."""
    return ComposedVlmEngine.from_folder(checkpoint, options, family=FAMILY, build=build)


def build_tiny_tinyllava(out: Path, seed: int = 0) -> Path:
    """A tiny random TinyLLaVA checkpoint (SigLIP 2 layers, Phi 2 layers) in the published layout."""
    from integrations.vlm.tiny import train_tokenizer

    torch.manual_seed(seed)
    tok = train_tokenizer(["<|endoftext|>"], bos="<|endoftext|>", eos="<|endoftext|>", pad="<|endoftext|>")
    text = {
        "model_type": "phi",
        "vocab_size": len(tok),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "partial_rotary_factor": 0.4,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    vision = {
        "model_type": "siglip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
    }
    config = {
        "architectures": ["TinyLlavaForConditionalGeneration"],
        "model_type": "tinyllava",
        "llm_model_name_or_path": "microsoft/phi-2",
        "vision_model_name_or_path": "google/siglip-so400m-patch14-384",
        "connector_type": "mlp2x_gelu",
        "text_config": text,
        "vision_config": vision,
        "hidden_size": text["hidden_size"],
        "vision_hidden_size": vision["hidden_size"],
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "patch",
        "image_aspect_ratio": "square",
        "tokenizer_padding_side": "right",
        "tokenizer_model_max_length": 2048,
    }
    root = TinyLlavaForConditionalGeneration(config).eval()
    out.mkdir(parents=True, exist_ok=True)
    composed.write_config(out, config)
    composed.save_weights(composed.published_state(root, root.renames()), out)
    tok.save_pretrained(str(out))
    composed.write_tiny_marker(out, family=FAMILY, stands_in_for=STANDS_IN_FOR, seed=seed)
    return out
