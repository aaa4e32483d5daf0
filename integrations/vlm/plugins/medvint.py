"""MedVInT-TD (PMC-VQA, Zhang et al. 2023; github.com/xiaoman-zhang/PMC-VQA, src/MedVInT_TD): the PMC-CLIP
ResNet-50 visual encoder cut after its third stage, 32 learned queries cross-attending to its feature map
(a DETR-style transformer decoder), a 2-layer projection, and a LLaMA decoder (LLaMA-7B or PMC-LLaMA)
fine-tuned with LoRA; the image's query tokens come before the text.

The release is a `pytorch_model.bin` of its `QA_model` and no config, so the folder adds a config.json:

    config.json   model_type "medvint"; text_config (the LLaMA's config.json, model_type "llama");
                  vision_config (PMC_CLIP_cfg: layers [3,4,6,3], width 64, head_width 64, output_dim 768,
                  image_size 224); query_decoder {num_queries 32, num_layers 12, num_heads 8,
                  dim_feedforward 1024} (the img_token_num / N / H arguments); lora {r 8, lora_alpha 32,
                  lora_dropout 0.1, target_modules [q_proj, v_proj]}; image_size 512 (the test-time resize)
    weights (the released state dict, as it is; model.safetensors or pytorch_model.bin)
        vision_model.0.weight (stem conv1), vision_model.1.* (bn1), vision_model.3/4/6/7.* (conv2, bn2, conv3,
        bn3), vision_model.10.* / 11.* / 12.* (ResNet layer1-3: N.conv1.weight, N.bn1.*, N.downsample.0.weight…)
                                         — nn.Sequential(*list(ModifiedResNet.children())[:-2]), hence indices
        query_embed.weight
        decoder.layers.N.self_attn.in_proj_weight, decoder.layers.N.multihead_attn.out_proj.weight,
        decoder.layers.N.linear1.weight, decoder.layers.N.norm1.weight, decoder.norm.weight
        fc_l1.weight, fc_l2.weight
        llamacasual.base_model.model.model.layers.N.self_attn.q_proj.weight (+ .lora_A.weight, .lora_B.weight),
        llamacasual.base_model.model.lm_head.weight   — the PEFT-wrapped LlamaForCausalLM (older PEFT's key
                                         names; newer ones with base_layer / .default are read too)
    tokenizer files   the LLaMA tokenizer the model was trained with

The LoRA weights are merged into the decoder at load. Prompt: "Question: {question}The Answer is:" after
the image tokens and BOS, as the PMC-VQA test set is asked; images are resized to image_size x image_size and
normalised with ImageNet's mean and std.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from integrations.errors import ConfigurationError
from integrations.vlm.engine import EngineOptions
from integrations.vlm.plugins import composed
from integrations.vlm.plugins.composed import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ComposedVlmEngine,
    ImageSpec,
    LoadedArchitecture,
    PromptSpec,
    VlmParts,
)

FAMILY = "medvint"
STANDS_IN_FOR = "MedVInT-TD (PMC-VQA: PMC-CLIP RN50 + PMC-LLaMA/LLaMA-7B, LoRA)"
PMC_VQA_TEMPLATE = "<image><s>Question: {text}The Answer is:"
LORA_PREFIX = "llamacasual."
PUBLISHED_KEYS = (
    "vision_model.0.weight",
    "vision_model.1.running_mean",
    "vision_model.10.0.conv1.weight",
    "vision_model.10.0.downsample.0.weight",
    "vision_model.12.0.bn3.weight",
    "query_embed.weight",
    "decoder.layers.0.self_attn.in_proj_weight",
    "decoder.layers.0.multihead_attn.out_proj.weight",
    "decoder.layers.0.linear1.weight",
    "decoder.norm.weight",
    "fc_l1.weight",
    "fc_l2.weight",
    "llamacasual.base_model.model.model.embed_tokens.weight",
    "llamacasual.base_model.model.model.layers.0.self_attn.q_proj.weight",
    "llamacasual.base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
    "llamacasual.base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight",
    "llamacasual.base_model.model.lm_head.weight",
)


class QueryDecoderLayer(nn.Module):  # type: ignore[misc]
    """DETR's TransformerDecoderLayer with normalize_before=True (PMC-VQA's models/transformer.py)."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, tgt: Any, memory: Any) -> Any:
        t = self.norm1(tgt)
        tgt = tgt + self.dropout1(self.self_attn(t, t, value=t, need_weights=False)[0])
        t = self.norm2(tgt)
        tgt = tgt + self.dropout2(self.multihead_attn(t, memory, value=memory, need_weights=False)[0])
        t = self.norm3(tgt)
        return tgt + self.dropout3(self.linear2(self.dropout(torch.relu(self.linear1(t)))))


class QueryDecoder(nn.Module):  # type: ignore[misc]
    """DETR's TransformerDecoder: `layers`, then `norm`; sequence-first tensors (L, B, C)."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(QueryDecoderLayer(d_model, nhead, dim_feedforward) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt: Any, memory: Any) -> Any:
        for layer in self.layers:
            tgt = layer(tgt, memory)
        return self.norm(tgt)


def pmc_clip_visual(vision: dict[str, Any]) -> Any:
    """PMC-CLIP's ModifiedResNet (open_clip's, the same module tree) cut before layer4 and the attention
    pool, as MedVInT does: `nn.Sequential(*list(vision_model.children())[:-2])`."""
    from open_clip.modified_resnet import ModifiedResNet

    width = int(vision.get("width", 64))
    resnet = ModifiedResNet(
        layers=list(composed.require(vision, "layers", list, where="vision_config")),
        output_dim=int(vision.get("output_dim", 768)),
        heads=width * 32 // int(vision.get("head_width", 64)),
        image_size=int(vision.get("image_size", 224)),
        width=width,
    )
    return nn.Sequential(*list(resnet.children())[:-2])


class QAModel(nn.Module):  # type: ignore[misc]
    """MedVInT-TD's `QA_model`: vision_model, query_embed, decoder, fc_l1, fc_l2, llamacasual."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        from peft import LoraConfig, TaskType, get_peft_model

        vision = composed.require(config, "vision_config", dict)
        query = composed.require(config, "query_decoder", dict)
        text = composed.require(config, "text_config", dict)
        lora = composed.require(config, "lora", dict)
        channels = int(vision.get("width", 64)) * 16  # ResNet layer3's output: width * 4 planes * expansion 4
        self.vision_model = pmc_clip_visual(vision)
        self.query_embed = nn.Embedding(int(query.get("num_queries", 32)), channels)
        self.decoder = QueryDecoder(
            channels,
            int(query.get("num_heads", 8)),
            int(query.get("dim_feedforward", 1024)),
            int(query.get("num_layers", 12)),
        )
        self.fc_l1 = nn.Linear(channels, channels)
        self.fc_l2 = nn.Linear(channels, int(composed.require(text, "hidden_size", int, where="text_config")))
        self.target_modules = tuple(lora.get("target_modules", ("q_proj", "v_proj")))
        peft_config = LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=int(lora.get("r", 8)),
            lora_alpha=int(lora.get("lora_alpha", 32)),
            lora_dropout=float(lora.get("lora_dropout", 0.1)),
            target_modules=list(self.target_modules),
        )
        self.llamacasual: Any = get_peft_model(composed.causal_lm(text), peft_config)

    def image_tokens(self, pixel_values: Any) -> Any:
        feature_map = self.vision_model(pixel_values)  # (B, C, h, w)
        memory = feature_map.flatten(2).permute(2, 0, 1)  # (h*w, B, C)
        queries = self.query_embed.weight.unsqueeze(1).repeat(1, pixel_values.shape[0], 1)
        features = self.decoder(queries, memory).transpose(0, 1)  # (B, Q, C)
        return self.fc_l2(torch.relu(self.fc_l1(features)))


def to_current_peft_keys(state: dict[str, Any], target_modules: tuple[str, ...]) -> dict[str, Any]:
    """Older PEFT names (the release's) → this PEFT's: `q_proj.weight` → `q_proj.base_layer.weight`,
    `lora_A.weight` → `lora_A.default.weight` (the renaming PMC-VQA's test.py describes)."""
    targets = "|".join(re.escape(t) for t in target_modules)
    base = re.compile(rf"\.({targets})\.(weight|bias)$")
    out = {}
    for key, value in state.items():
        if key.startswith(LORA_PREFIX):
            key = re.sub(r"\.(lora_[AB])\.weight$", r".\1.default.weight", key)
            key = base.sub(r".\1.base_layer.\2", key)
        out[key] = value
    return out


def to_published_peft_keys(state: dict[str, Any]) -> dict[str, Any]:
    """The reverse: this PEFT's names → the released checkpoint's."""
    return {k.replace(".base_layer.", ".").replace(".default.", "."): v for k, v in state.items()}


def build(folder: Path, config: dict[str, Any], options: EngineOptions) -> LoadedArchitecture:
    if config.get("model_type") != FAMILY:
        raise ConfigurationError(f"{folder}/config.json is not a MedVInT checkpoint (model_type {FAMILY!r})")
    with composed.skip_init():
        root = QAModel(config)
    state = to_current_peft_keys(composed.read_state_dict(folder), root.target_modules)
    composed.require_complete(composed.load_weights(root, state))
    del state
    root.llamacasual = root.llamacasual.merge_and_unload()  # the LoRA fine-tune, merged: a plain LLaMA
    parts = VlmParts(
        root=root, language_model=root.llamacasual, vision_tower=root.vision_model, encode=root.image_tokens
    )
    nightread = config.get("nightread", {})
    image = (
        composed.image_spec(nightread["image_processor"], where="config.json nightread")
        if "image_processor" in nightread
        else ImageSpec(size=int(config.get("image_size", 512)), mean=IMAGENET_MEAN, std=IMAGENET_STD)
    )
    prompt = PromptSpec(template=str(nightread.get("prompt_template", PMC_VQA_TEMPLATE)), stop_tokens=("</s>",))
    return LoadedArchitecture(parts=parts, prompt=prompt, image=image)


def load(checkpoint: str, options: EngineOptions) -> ComposedVlmEngine:
    """The `nightread.engines` entry point `medvint`."""
    return ComposedVlmEngine.from_folder(checkpoint, options, family=FAMILY, build=build)


def build_tiny_medvint(out: Path, seed: int = 0) -> Path:
    """A tiny random MedVInT-TD (ResNet width 8, 4 queries, 1 decoder layer, Llama 2 layers, LoRA r=4), its
    weights saved under the released names (older PEFT's)."""
    from integrations.vlm.tiny import train_tokenizer

    torch.manual_seed(seed)
    tok = train_tokenizer(["<unk>", "<s>", "</s>"], bos="<s>", eos="</s>", pad="<unk>", unk="<unk>")
    config = {
        "model_type": FAMILY,
        "text_config": {
            "model_type": "llama",
            "vocab_size": len(tok),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "max_position_embeddings": 2048,
            "tie_word_embeddings": False,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        },
        "vision_config": {"layers": [1, 1, 1, 1], "width": 8, "head_width": 8, "output_dim": 32, "image_size": 64},
        "query_decoder": {"num_queries": 4, "num_layers": 1, "num_heads": 2, "dim_feedforward": 64},
        "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
        "image_size": 64,
    }
    root = QAModel(config).eval()
    with torch.no_grad():
        for name, param in root.named_parameters():
            if "lora_B" in name:  # LoRA starts as a no-op (B = 0): make the fine-tune matter
                param.normal_(0.0, 0.5)
            elif name.endswith("bn3.weight"):  # ModifiedResNet zero-initialises these: let the blocks speak
                param.normal_(1.0, 0.1)
    out.mkdir(parents=True, exist_ok=True)
    composed.write_config(out, config)
    composed.save_weights(to_published_peft_keys(composed.published_state(root)), out)
    tok.save_pretrained(str(out))
    composed.write_tiny_marker(out, family=FAMILY, stands_in_for=STANDS_IN_FOR, seed=seed)
    return out
