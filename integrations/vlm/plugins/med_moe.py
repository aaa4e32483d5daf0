"""Med-MoE (MoE-TinyMed, Jiang et al. 2024; github.com/jiangsongtao/Med-MoE): MoE-LLaVA's layout — a CLIP
ViT image tower, an MLP projector and a Phi-2 decoder whose MLP is a sparse mixture of experts on every
other layer — with Med-MoE's additions: a router with a bias and an always-on "meta expert" (the dense MLP).

Published layout (MoE-LLaVA's `MoELLaVAPhiForCausalLM`, a PhiForCausalLM with the vision modules inside
`model`), read here as it is:

    config.json   model_type "moe_llava_phi"; Phi-2's fields at the top level; mm_image_tower (the CLIP
                  tower's hub id or folder, "openai/clip-vit-large-patch14-336"), image_projector_type
                  "mlp2x_gelu", mm_hidden_size, mm_vision_select_layer -2, mm_vision_select_feature "patch",
                  image_aspect_ratio "pad"; moe {moe_layers_idx, num_experts, top_k_experts, …}.
                  nightread reads the tower's CLIPVisionConfig from `image_tower_config` when present (the
                  tiny build writes it), else from `mm_image_tower` (a local folder or the hub cache).
    weights
        model.embed_tokens.weight, model.layers.N.self_attn.{q,k,v}_proj, model.layers.N.self_attn.dense,
        model.layers.N.mlp.fc{1,2} (dense layers), model.final_layernorm, lm_head.weight (no bias)
        model.layers.N.mlp.deepspeed_moe.gate.wg.{weight,bias}                      the router
        model.layers.N.mlp.deepspeed_moe.experts.deepspeed_experts.E.fc{1,2}.*       the experts (Phi MLPs)
        model.layers.N.mlp.meta_moe.fc{1,2}.*                                       Med-MoE's meta expert
        model.image_tower.image_tower.vision_model.*                                 CLIPVisionModel
        model.mm_projector.image_spatial_proj.{0,2}.*                                Linear, GELU, Linear
    tokenizer files   Phi-2's

When the checkpoint has no image tower weights, they are loaded from `mm_image_tower` (a CLIPVisionModel
folder). Plain MoE-LLaVA-Phi checkpoints load too: no meta expert or router bias in the weights, none used.

Routing is DeepSpeed's top-k gating without its randomness: top-1 sends each token to its best expert
weighted by the softmax gate (Med-MoE: top-1 plus the meta expert, the "×4-Top2" of its model zoo); top-2
uses the two best experts with renormalised gates — DeepSpeed picks the second by a Gumbel-noised argmax
at inference too, which is not reproducible, so the second-best is taken. No token is dropped (Med-MoE's
capacity factor of 4 never drops at top-1/top-2 with 4 experts).
"""

from __future__ import annotations

import copy
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
    ComposedVlmEngine,
    ImageSpec,
    LoadedArchitecture,
    PromptSpec,
    VlmParts,
)
from integrations.vlm.plugins.tinyllava import PHI_TEMPLATE

FAMILY = "med_moe"
STANDS_IN_FOR = "JsST/TinyMed Stage3 (Med-MoE / MoE-TinyMed, Phi-2 4 experts)"
MODEL_TYPE = "moe_llava_phi"
# config keys that are not Phi's own
_MULTIMODAL_KEYS = {
    "architectures",
    "model_type",
    "moe",
    "image_tower_config",
    "nightread",
    "transformers_version",
    "_name_or_path",
}
_MULTIMODAL_PREFIXES = ("mm_", "image_", "video_", "tune_", "freeze_", "use_mm", "tokenizer_")
PUBLISHED_KEYS = (
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.mlp.deepspeed_moe.gate.wg.weight",
    "model.layers.0.mlp.deepspeed_moe.gate.wg.bias",
    "model.layers.0.mlp.deepspeed_moe.experts.deepspeed_experts.0.fc1.weight",
    "model.layers.0.mlp.deepspeed_moe.experts.deepspeed_experts.3.fc2.weight",
    "model.layers.0.mlp.meta_moe.fc1.weight",
    "model.layers.1.mlp.fc1.weight",
    "model.final_layernorm.weight",
    "lm_head.weight",
    "model.image_tower.image_tower.vision_model.embeddings.patch_embedding.weight",
    "model.image_tower.image_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight",
    "model.mm_projector.image_spatial_proj.0.weight",
    "model.mm_projector.image_spatial_proj.2.weight",
)


class TopKGate(nn.Module):  # type: ignore[misc]
    """DeepSpeed's gate: the router `wg` (Med-MoE's has a bias), computed in float32."""

    def __init__(self, hidden: int, num_experts: int, *, bias: bool) -> None:
        super().__init__()
        self.wg = nn.Linear(hidden, num_experts, bias=bias)

    def forward(self, x: Any) -> Any:
        bias = None if self.wg.bias is None else self.wg.bias.float()
        return nn.functional.linear(x.float(), self.wg.weight.float(), bias)


class Experts(nn.Module):  # type: ignore[misc]
    def __init__(self, expert: Any, num_experts: int) -> None:
        super().__init__()
        self.deepspeed_experts = nn.ModuleList(copy.deepcopy(expert) for _ in range(num_experts))


class MOELayer(nn.Module):  # type: ignore[misc]
    def __init__(self, gate: TopKGate, experts: Experts) -> None:
        super().__init__()
        self.gate = gate
        self.experts = experts


class MoE(nn.Module):  # type: ignore[misc]
    """The MLP of an MoE layer (DeepSpeed's `MoE` as MoE-LLaVA / Med-MoE use it): returns a tensor, as the
    transformers Phi decoder layer expects of its MLP."""

    def __init__(self, expert: Any, hidden: int, *, num_experts: int, k: int, gate_bias: bool, meta: bool) -> None:
        super().__init__()
        if k not in (1, 2):
            raise ConfigurationError(f"config.json: moe.top_k_experts must be 1 or 2, not {k}")
        self.k = k
        self.deepspeed_moe = MOELayer(TopKGate(hidden, num_experts, bias=gate_bias), Experts(expert, num_experts))
        self.meta_moe = expert if meta else None

    def forward(self, hidden_states: Any) -> Any:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        gates = torch.softmax(self.deepspeed_moe.gate(x), dim=-1)
        weights, chosen = torch.topk(gates, self.k, dim=-1)
        if self.k == 2:
            weights = weights / weights.sum(-1, keepdim=True).clamp(min=torch.finfo(weights.dtype).eps)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.deepspeed_moe.experts.deepspeed_experts):
            token, slot = torch.nonzero(chosen == e, as_tuple=True)
            if token.numel():
                out.index_add_(0, token, (expert(x[token]) * weights[token, slot, None].to(x.dtype)))
        if self.meta_moe is not None:
            out = out + self.meta_moe(x)
        return out.reshape(shape)


class ClipImageTower(nn.Module):  # type: ignore[misc]
    """MoE-LLaVA's CLIPVisionTower: the CLIPVisionModel under `image_tower`, features at `select_layer`."""

    def __init__(self, model: Any, *, select_layer: int, select_feature: str) -> None:
        super().__init__()
        self.image_tower = model
        self.select_layer = select_layer
        self.select_feature = select_feature

    def features(self, pixel_values: Any) -> Any:
        hidden = self.image_tower(pixel_values, output_hidden_states=True).hidden_states[self.select_layer]
        return hidden[:, 1:] if self.select_feature == "patch" else hidden


class ImageProjector(nn.Module):  # type: ignore[misc]
    """MoE-LLaVA's `build_projector`: the image projector under `image_spatial_proj`."""

    def __init__(self, projector_type: str, mm_hidden: int, hidden: int) -> None:
        super().__init__()
        if projector_type == "linear":
            self.image_spatial_proj: Any = nn.Linear(mm_hidden, hidden)
        elif projector_type == "mlp2x_gelu":
            self.image_spatial_proj = nn.Sequential(nn.Linear(mm_hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        else:
            raise ConfigurationError(
                f"config.json: image_projector_type {projector_type!r} is not linear or mlp2x_gelu"
            )


def phi_config(config: dict[str, Any]) -> dict[str, Any]:
    """Phi's own fields of a MoE-LLaVA config (the multimodal and MoE fields left out)."""
    phi = {k: v for k, v in config.items() if k not in _MULTIMODAL_KEYS and not k.startswith(_MULTIMODAL_PREFIXES)}
    return {**phi, "model_type": "phi"}


def _image_tower_config(folder: Path, config: dict[str, Any]) -> dict[str, Any]:
    if "image_tower_config" in config:
        return dict(composed.require(config, "image_tower_config", dict))
    from transformers import CLIPVisionConfig

    tower = composed.require(config, "mm_image_tower", str)
    try:
        return {**CLIPVisionConfig.from_pretrained(tower).to_dict(), "model_type": "clip_vision_model"}
    except OSError as exc:
        raise ConfigurationError(
            f"{folder}/config.json: the image tower {tower!r} is not a local folder or cached; "
            "set mm_image_tower to a CLIP vision folder, or add image_tower_config"
        ) from exc


def build_root(config: dict[str, Any], tower_config: dict[str, Any], *, gate_bias: bool, meta: bool) -> Any:
    """A PhiForCausalLM with MoE-LLaVA's MoE layers, bias-free lm_head and vision modules inside `model`."""
    moe = composed.require(config, "moe", dict)
    root = composed.causal_lm(phi_config(config))
    hidden, vocab = root.config.hidden_size, root.config.vocab_size
    root.lm_head = nn.Linear(hidden, vocab, bias=False)  # MoELLaVAPhiForCausalLM's head has no bias
    layers = list(composed.require(moe, "moe_layers_idx", list, where="config.json moe"))
    experts = list(composed.require(moe, "num_experts", list, where="config.json moe"))
    if len(experts) == 1:
        experts *= len(layers)
    if len(experts) != len(layers):
        raise ConfigurationError("config.json moe: num_experts must have one entry, or one per moe_layers_idx")
    k = int(moe.get("top_k_experts", 2))
    for idx, n in zip(layers, experts, strict=True):
        layer = root.model.layers[idx]
        layer.mlp = MoE(layer.mlp, hidden, num_experts=int(n), k=k, gate_bias=gate_bias, meta=meta)
    tower = composed.vision_model(tower_config, where="image_tower_config")
    root.model.image_tower = ClipImageTower(
        tower,
        select_layer=int(config.get("mm_vision_select_layer", -2)),
        select_feature=str(config.get("mm_vision_select_feature", "patch")),
    )
    root.model.mm_projector = ImageProjector(
        str(config.get("image_projector_type", "mlp2x_gelu")), int(tower.config.hidden_size), hidden
    )
    return root


def _image_spec(config: dict[str, Any], tower_config: dict[str, Any]) -> ImageSpec:
    override = config.get("nightread", {}).get("image_processor")
    if override is not None:
        return composed.image_spec(override, where="config.json nightread")
    return ImageSpec(
        size=int(tower_config.get("image_size", 336)),
        mean=CLIP_MEAN,
        std=CLIP_STD,
        resize="pad" if config.get("image_aspect_ratio", "pad") == "pad" else "center_crop",
    )


def build(folder: Path, config: dict[str, Any], options: EngineOptions) -> LoadedArchitecture:
    if config.get("model_type") != MODEL_TYPE:
        raise ConfigurationError(f"{folder}/config.json is not a MoE-LLaVA Phi checkpoint (model_type {MODEL_TYPE!r})")
    state = composed.read_state_dict(folder)
    tower_config = _image_tower_config(folder, config)
    with composed.skip_init():
        root = build_root(
            config,
            tower_config,
            gate_bias=any(k.endswith("deepspeed_moe.gate.wg.bias") for k in state),
            meta=any(".mlp.meta_moe." in k for k in state),
        )
    tower_prefix = "model.image_tower.image_tower."
    missing = composed.load_weights(root, state, renames=_renames(root))
    del state
    if missing and all(k.startswith(tower_prefix) for k in missing):  # LLaVA-style: the tower from its own folder
        _load_tower(root, composed.require(config, "mm_image_tower", str))
        missing = []
    composed.require_complete(missing)
    image_tower = root.model.image_tower
    projector = root.model.mm_projector.image_spatial_proj
    parts = VlmParts(
        root=root,
        language_model=root,
        vision_tower=image_tower.image_tower,
        encode=lambda pixels: projector(image_tower.features(pixels)),
    )
    template = config.get("nightread", {}).get("prompt_template", PHI_TEMPLATE)
    prompt = PromptSpec(template=str(template), stop_tokens=("<|endoftext|>",))
    return LoadedArchitecture(parts=parts, prompt=prompt, image=_image_spec(config, tower_config))


def _renames(root: Any) -> list[tuple[str, str]]:
    return composed.vision_renames("model.image_tower.image_tower.", root.model.image_tower.image_tower)


def _load_tower(root: Any, tower: str) -> None:
    from transformers import CLIPVisionModel

    try:
        weights = CLIPVisionModel.from_pretrained(tower).state_dict()
    except OSError as exc:
        raise ConfigurationError(f"the image tower weights are not in the checkpoint nor at {tower!r}") from exc
    root.model.image_tower.image_tower.load_state_dict(weights)


def load(checkpoint: str, options: EngineOptions) -> ComposedVlmEngine:
    """The `nightread.engines` entry point `med_moe`."""
    return ComposedVlmEngine.from_folder(checkpoint, options, family=FAMILY, build=build)


def build_tiny_med_moe(out: Path, seed: int = 0) -> Path:
    """A tiny random Med-MoE (CLIP 2 layers, Phi 2 layers, 4 experts on layer 0, top-1 + meta expert)."""
    from integrations.vlm.tiny import train_tokenizer

    torch.manual_seed(seed)
    tok = train_tokenizer(["<|endoftext|>"], bos="<|endoftext|>", eos="<|endoftext|>", pad="<|endoftext|>")
    tower = {
        "model_type": "clip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
        "projection_dim": 32,
    }
    config = {
        "architectures": ["MoELLaVAPhiForCausalLM"],
        "model_type": MODEL_TYPE,
        "vocab_size": len(tok),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "partial_rotary_factor": 0.4,
        "max_position_embeddings": 2048,
        "hidden_act": "gelu_new",
        "tie_word_embeddings": False,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "mm_image_tower": "openai/clip-vit-large-patch14-336",
        "image_projector_type": "mlp2x_gelu",
        "mm_hidden_size": tower["hidden_size"],
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "image_aspect_ratio": "pad",
        "mm_use_im_start_end": False,
        "moe": {
            "moe_enable": True,
            "moe_mode": "sparse",
            "moe_layers_idx": [0],
            "num_experts": [4],
            "top_k_experts": 1,
            "capacity_factor": 1.5,
            "eval_capacity_factor": 4.0,
            "min_capacity": 0,
            "use_residual": False,
            "router_aux_loss_coef": 0.0,
            "ep_size": 1,
        },
        "image_tower_config": tower,
    }
    root = build_root(config, tower, gate_bias=True, meta=True).eval()
    with torch.no_grad():  # distinct experts (MoE-LLaVA initialises them as copies of the dense MLP)
        for name, param in root.named_parameters():
            if ".deepspeed_experts." in name or ".gate.wg." in name:
                param.normal_(0.0, 0.2)
    out.mkdir(parents=True, exist_ok=True)
    composed.write_config(out, config)
    composed.save_weights(composed.published_state(root, _renames(root)), out)
    tok.save_pretrained(str(out))
    composed.write_tiny_marker(out, family=FAMILY, stands_in_for=STANDS_IN_FOR, seed=seed)
    return out
