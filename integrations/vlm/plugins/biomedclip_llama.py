"""BiomedCLIP + LLaMA-3 with LoRA (arXiv 2504.05575): BiomedCLIP's ViT-B/16 image tower (open_clip's timm
layout), an MLP projector and a LLaMA-3 decoder fine-tuned with a PEFT LoRA adapter on q_proj/v_proj.

The paper's own release layout is not known here, so the folder is nightread's, built from the parts as
they are published:

    config.json          model_type "biomedclip_llama"; open_clip_config (BiomedCLIP's open_clip_config.json:
                         model_cfg.embed_dim, model_cfg.vision_cfg {timm_model_name "vit_base_patch16_224",
                         timm_pool "", timm_proj "linear", image_size 224}, preprocess_cfg {mean, std});
                         text_config (Meta-Llama-3's config.json, model_type "llama"); projector_type
                         "mlp2x_gelu"; vision_feature_select "patch"; lora_merge (true: merged, false: active)
    model.safetensors
        visual.trunk.patch_embed.proj.weight, visual.trunk.cls_token, visual.trunk.pos_embed,
        visual.trunk.blocks.N.attn.qkv.weight, visual.trunk.blocks.N.mlp.fc1.weight, visual.trunk.norm.weight,
        visual.head.proj.weight      — BiomedCLIP's open_clip checkpoint keys, unchanged (its `text.*` and
                                       `logit_scale` entries are ignored when present)
        mm_projector.0.weight, mm_projector.2.weight          — Linear(768, hidden), GELU, Linear(hidden, hidden)
        language_model.model.embed_tokens.weight, language_model.model.layers.N.self_attn.q_proj.weight, …,
        language_model.lm_head.weight                        — LlamaForCausalLM with the prefix `language_model.`
    adapter_config.json, adapter_model.safetensors   the PEFT LoRA adapter (r, alpha; target q_proj, v_proj),
                         keys base_model.model.model.layers.N.self_attn.{q,v}_proj.lora_{A,B}.weight
    tokenizer files      LLaMA-3's (tokenizer.json)

Converting: copy BiomedCLIP's `open_clip_pytorch_model.bin` entries (all `visual.*`), Llama-3's weights with
`language_model.` prepended and the trained projector into model.safetensors; put the adapter folder's two
files beside it (or point NIGHTREAD_INFERENCE__ADAPTER at it). The adapter applied is recorded as the engine's
`options.adapter` (model_version provenance). Image tokens: the ViT's last-layer patch tokens (after its final
norm, CLS dropped); the chat is LLaMA-3 Instruct's.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from integrations.errors import ConfigurationError
from integrations.vlm.engine import EngineOptions
from integrations.vlm.plugins import composed
from integrations.vlm.plugins.composed import (
    ADAPTER_CONFIG_FILE,
    CLIP_MEAN,
    CLIP_STD,
    ComposedVlmEngine,
    ImageSpec,
    LoadedArchitecture,
    PromptSpec,
    VlmParts,
)

FAMILY = "biomedclip_llama"
STANDS_IN_FOR = "BiomedCLIP ViT-B/16 + Meta-Llama-3-8B-Instruct with LoRA (arXiv 2504.05575)"
LLAMA3_TEMPLATE = (
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<image>\n{text}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# BiomedCLIP-PubMedBERT_256-vit_base_patch16_224's open_clip_config.json (the vision part and preprocessing)
BIOMEDCLIP_OPEN_CLIP_CONFIG: dict[str, Any] = {
    "model_cfg": {
        "embed_dim": 512,
        "vision_cfg": {
            "timm_model_name": "vit_base_patch16_224",
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "linear",
            "image_size": 224,
        },
    },
    "preprocess_cfg": {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)},
}
PUBLISHED_KEYS = (
    "visual.trunk.patch_embed.proj.weight",
    "visual.trunk.cls_token",
    "visual.trunk.pos_embed",
    "visual.trunk.blocks.0.attn.qkv.weight",
    "visual.trunk.blocks.0.mlp.fc1.weight",
    "visual.trunk.norm.weight",
    "visual.head.proj.weight",
    "mm_projector.0.weight",
    "mm_projector.2.weight",
    "language_model.model.layers.0.self_attn.q_proj.weight",
    "language_model.lm_head.weight",
)
ADAPTER_KEYS = (
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
    "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight",
)


class OpenClipTimmVisual(nn.Module):  # type: ignore[misc]
    """open_clip's `TimmModel` layout (BiomedCLIP's `visual`): `trunk` (a timm model) and `head` (the CLIP
    projection). `forward(x)` is the CLIP image embedding; `forward(x, tokens=True)` the trunk's tokens."""

    def __init__(self, model_cfg: dict[str, Any]) -> None:
        super().__init__()
        import timm

        vision = composed.require(model_cfg, "vision_cfg", dict, where="open_clip_config.model_cfg")
        name = composed.require(vision, "timm_model_name", str, where="open_clip_config vision_cfg")
        kwargs = dict(vision.get("timm_model_kwargs", {}))  # nightread's: the tiny build's dimensions
        self.trunk = timm.create_model(name, pretrained=False, **kwargs)
        pool = str(vision.get("timm_pool", "avg"))
        self.trunk.reset_classifier(0, **({"global_pool": pool} if pool else {}))
        head: OrderedDict[str, Any] = OrderedDict()
        proj = vision.get("timm_proj", "linear")
        if proj == "linear":
            head["drop"] = nn.Dropout(float(vision.get("timm_drop", 0.0)))
            head["proj"] = nn.Linear(
                self.trunk.num_features,
                int(model_cfg.get("embed_dim", 512)),
                bias=bool(vision.get("timm_proj_bias", False)),
            )
        elif proj not in ("none", "", None):
            raise ConfigurationError(f"open_clip_config: timm_proj {proj!r} is not supported (linear or none)")
        self.head = nn.Sequential(head)

    def forward(self, x: Any, *, tokens: bool = False) -> Any:
        if tokens:
            return self.trunk.forward_features(x)
        return self.head(self.trunk(x))


class BiomedClipLlama(nn.Module):  # type: ignore[misc]
    """`visual` (BiomedCLIP image tower) → `mm_projector` → `language_model` (LlamaForCausalLM)."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        open_clip_cfg = composed.require(config, "open_clip_config", dict)
        text = composed.require(config, "text_config", dict)
        self.visual = OpenClipTimmVisual(composed.require(open_clip_cfg, "model_cfg", dict, where="open_clip_config"))
        self.select = str(config.get("vision_feature_select", "patch"))
        width, hidden = self.visual.trunk.num_features, int(composed.require(text, "hidden_size", int))
        projector = str(config.get("projector_type", "mlp2x_gelu"))
        if projector == "linear":
            self.mm_projector: Any = nn.Linear(width, hidden)
        elif projector == "mlp2x_gelu":
            self.mm_projector = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        else:
            raise ConfigurationError(f"config.json: projector_type {projector!r} is not linear or mlp2x_gelu")
        self.language_model = composed.causal_lm(text)

    def image_tokens(self, pixel_values: Any) -> Any:
        tokens = self.visual(pixel_values, tokens=True)
        if self.select == "patch":
            tokens = tokens[:, self.visual.trunk.num_prefix_tokens :]
        return self.mm_projector(tokens)


def _image_spec(config: dict[str, Any]) -> ImageSpec:
    override = config.get("nightread", {}).get("image_processor")
    if override is not None:
        return composed.image_spec(override, where="config.json nightread")
    cfg = config["open_clip_config"]
    pre = cfg.get("preprocess_cfg", {})
    return ImageSpec(
        size=int(cfg["model_cfg"]["vision_cfg"].get("image_size", 224)),
        mean=tuple(pre.get("mean", CLIP_MEAN)),
        std=tuple(pre.get("std", CLIP_STD)),
        resize="center_crop",
    )


def build(folder: Path, config: dict[str, Any], options: EngineOptions) -> LoadedArchitecture:
    if config.get("model_type") != FAMILY:
        raise ConfigurationError(f"{folder}/config.json is not a {FAMILY} checkpoint (model_type {FAMILY!r})")
    with composed.skip_init():
        root = BiomedClipLlama(config)
    missing = composed.load_weights(root, composed.read_state_dict(folder), ignore_prefixes=("text.", "logit_scale"))
    composed.require_complete(missing)
    adapter = options.adapter or (str(folder) if (folder / ADAPTER_CONFIG_FILE).is_file() else None)
    if adapter:
        composed.apply_lora(root.language_model, adapter, merge=bool(config.get("lora_merge", True)))
    parts = VlmParts(root=root, language_model=root.language_model, vision_tower=root.visual, encode=root.image_tokens)
    template = config.get("nightread", {}).get("prompt_template", LLAMA3_TEMPLATE)
    prompt = PromptSpec(template=str(template), stop_tokens=("<|eot_id|>", "<|end_of_text|>"))
    return LoadedArchitecture(parts=parts, prompt=prompt, image=_image_spec(config), adapter=adapter)


def load(checkpoint: str, options: EngineOptions) -> ComposedVlmEngine:
    """The `nightread.engines` entry point `biomedclip_llama`."""
    return ComposedVlmEngine.from_folder(checkpoint, options, family=FAMILY, build=build)


def tiny_config(vocab_size: int, *, bos: int, eos: int, pad: int) -> dict[str, Any]:
    open_clip_cfg = {
        **BIOMEDCLIP_OPEN_CLIP_CONFIG,
        "model_cfg": {
            "embed_dim": 32,
            "vision_cfg": {
                **BIOMEDCLIP_OPEN_CLIP_CONFIG["model_cfg"]["vision_cfg"],
                "image_size": 32,
                "timm_model_kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 32, "patch_size": 8},
            },
        },
    }
    text = {
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
    }
    return {
        "model_type": FAMILY,
        "open_clip_config": open_clip_cfg,
        "text_config": text,
        "projector_type": "mlp2x_gelu",
        "vision_feature_select": "patch",
        "lora_merge": True,
    }


def build_tiny_biomedclip_llama(out: Path, seed: int = 0, *, adapter: bool = True) -> Path:
    """A tiny random checkpoint (ViT 2 layers, Llama 2 layers) and, unless `adapter=False`, a LoRA adapter
    on q_proj/v_proj beside it (its B matrices random, so it changes the answers)."""
    from integrations.vlm.tiny import train_tokenizer

    torch.manual_seed(seed)
    tok = train_tokenizer(
        LLAMA3_SPECIALS, bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|end_of_text|>", vocab_size=1024
    )
    config = tiny_config(len(tok), bos=tok.bos_token_id, eos=tok.eos_token_id, pad=tok.pad_token_id)
    root = BiomedClipLlama(config).eval()
    out.mkdir(parents=True, exist_ok=True)
    composed.write_config(out, config)
    composed.save_weights(composed.published_state(root), out)
    tok.save_pretrained(str(out))
    if adapter:
        write_tiny_adapter(root.language_model, out, seed=seed + 1)
    composed.write_tiny_marker(out, family=FAMILY, stands_in_for=STANDS_IN_FOR, seed=seed)
    return out


def write_tiny_adapter(language_model: Any, out: Path, *, seed: int) -> Path:
    """A random LoRA adapter (r=4, alpha=8, q_proj/v_proj) for `language_model`, saved in PEFT's format."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(language_model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # LoRA starts as a no-op (B = 0): make this one change the model
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out))
    (out / "README.md").unlink(missing_ok=True)  # PEFT's model-card template
    return out
