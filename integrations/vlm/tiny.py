"""Tiny randomly initialised checkpoints, built offline, that load through the real loading path.

No weights can be downloaded on the machines this project is tested on. `build_tiny(family, out)`
writes a folder a real checkpoint would have (config.json, model.safetensors, tokenizer files with a
BPE tokenizer trained here with `tokenizers`, processor config, chat template) so that
`AutoProcessor` and `AutoModelForImageTextToText` load it exactly as they load a hub checkpoint.
Their answers are random: they test plumbing and speed, never quality.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

TINY_MARKER = "nightread_tiny.json"

# The real checkpoint each tiny family stands in for (documented in the README).
STANDS_IN_FOR = {
    "smolvlm": "HuggingFaceTB/SmolVLM-256M-Instruct",
    "idefics3": "HuggingFaceM4/Idefics3-8B-Llama3",
    "idefics": "HuggingFaceM4/idefics-9b-instruct",
    "llava": "llava-hf/llava-1.5-7b-hf",
    "llava_next": "llava-hf/llava-v1.6-mistral-7b-hf",
    "paligemma": "google/paligemma-3b-mix-224",
    "qwen2_vl": "Qwen/Qwen2-VL-2B-Instruct",
    "qwen2_5_vl": "Qwen/Qwen2.5-VL-3B-Instruct",
    "gemma3": "google/medgemma-4b-it",
    "ved": "nlpconnect/vit-gpt2-image-captioning",
}

_FINDINGS = [
    "pleural effusion",
    "pneumothorax",
    "cardiomegaly",
    "consolidation",
    "atelectasis",
    "pulmonary edema",
    "nodule",
    "fracture",
    "mass",
    "hemorrhage",
    "emphysema",
    "fibrosis",
]
_WORDS = [
    "the",
    "a",
    "is",
    "there",
    "no",
    "yes",
    "an",
    "of",
    "in",
    "on",
    "with",
    "without",
    "left",
    "right",
    "bilateral",
    "small",
    "large",
    "mild",
    "moderate",
    "severe",
    "chest",
    "x-ray",
    "ct",
    "mri",
    "image",
    "study",
    "shows",
    "findings",
    "impression",
    "normal",
    "abnormal",
    "lung",
    "lungs",
    "heart",
    "mediastinum",
    "describe",
    "this",
    "radiograph",
    "question",
    "answer",
    "user",
    "assistant",
    "system",
    "axial",
    "frontal",
    "lateral",
    "view",
    "brain",
    "slice",
    "window",
    "modality",
    "body",
    "part",
    "patient",
    "position",
]

SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
}
_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
# Gemma text models (PaliGemma, Gemma 3) have an explicit head size
_GEMMA_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
}


def _corpus(n: int = 3000, seed: int = 0) -> Iterator[str]:
    rng = random.Random(seed)
    for _ in range(n):
        finding = rng.choice(_FINDINGS)
        yield rng.choice(
            [
                f"Is there a {finding}?",
                f"There is a {rng.choice(['small', 'large', 'mild'])} {finding}.",
                f"No {finding}.",
                "Yes",
                "No",
                "yes",
                "no",
                " Yes",
                " No",
            ]
        )
        yield " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12)))


def train_tokenizer(
    special: list[str],
    *,
    bos: str | None = None,
    eos: str | None = None,
    pad: str | None = None,
    unk: str | None = None,
    named: dict[str, str] | None = None,
    chat_template: str | None = None,
    vocab_size: int = 1024,
) -> Any:
    """A byte-level BPE tokenizer trained offline, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        extra_special_tokens=dict(named or {}),
    )
    if chat_template:
        hf.chat_template = chat_template
    return hf


def smolvlm_tokenizer(vocab_size: int = 1024) -> Any:
    """The special tokens, roles and chat template of SmolVLM / Idefics3, with a BPE trained here."""
    rowcol = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    specials = [
        "<|endoftext|>",
        "<|im_start|>",
        "<end_of_utterance>",
        "<image>",
        "<fake_token_around_image>",
        "<global-img>",
        *rowcol,
    ]
    return train_tokenizer(
        specials,
        bos="<|im_start|>",
        eos="<end_of_utterance>",
        pad="<|endoftext|>",
        chat_template=SMOLVLM_CHAT_TEMPLATE,
        vocab_size=vocab_size,
    )


def smolvlm_text_config(tok: Any, **dims: Any) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "vocab_size": len(tok),
        **dims,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
    }


def _build_idefics3_style(kind: str) -> tuple[Any, Any]:
    """SmolVLM and Idefics3 share an architecture; SmolVLM's processor adds a video processor."""
    import transformers

    prefix = "SmolVLM" if kind == "smolvlm" else "Idefics3"
    config_cls, model_cls, image_cls, processor_cls = (
        getattr(transformers, f"{prefix}{suffix}")
        for suffix in ("Config", "ForConditionalGeneration", "ImageProcessor", "Processor")
    )
    tok = smolvlm_tokenizer()
    cfg = config_cls(
        vision_config={**_VISION, "image_size": 32, "patch_size": 8},
        text_config=smolvlm_text_config(tok, **_TEXT),
        scale_factor=2,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
    )
    sizes = {"size": {"longest_edge": 64}, "max_image_size": {"longest_edge": 32}}
    extra = {"video_processor": transformers.SmolVLMVideoProcessor(**sizes)} if kind == "smolvlm" else {}
    proc = processor_cls(
        image_processor=image_cls(**sizes, do_image_splitting=True),
        tokenizer=tok,
        image_seq_len=4,
        chat_template=SMOLVLM_CHAT_TEMPLATE,
        **extra,
    )
    model = model_cls(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, proc


LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<image>\\n' }}{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] + ' ' }}{% endif %}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<start_of_image>{% elif c['type'] == 'text' %}{{ c['text'] | trim }}{% endif %}"
    "{% endfor %}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


_LLAVA_TOKENS: dict[str, Any] = {
    "special": ["<unk>", "<s>", "</s>", "<image>", "<pad>"],
    "named": {"image_token": "<image>"},
    "bos": "<s>",
    "eos": "</s>",
    "pad": "<pad>",
    "unk": "<unk>",
    "chat_template": LLAVA_CHAT_TEMPLATE,
}


def _llava_config(tok: Any) -> dict[str, Any]:
    """What LLaVA-1.5 and LLaVA-NeXT configs share: CLIP vision tower, Llama text model, image token."""
    from transformers import CLIPVisionConfig, LlamaConfig

    return {
        "vision_config": CLIPVisionConfig(**_VISION, image_size=32, patch_size=8, projection_dim=32),
        "text_config": LlamaConfig(
            vocab_size=len(tok),
            **_TEXT,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        ),
        "image_token_id": tok.image_token_id,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
    }


def _build_llava() -> tuple[Any, Any]:
    from transformers import (
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = train_tokenizer(**_LLAVA_TOKENS)
    cfg = LlavaConfig(
        **_llava_config(tok),
    )
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc = LlavaProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return LlavaForConditionalGeneration(cfg), proc


def _build_llava_next() -> tuple[Any, Any]:
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    tok = train_tokenizer(**_LLAVA_TOKENS)
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]  # any-resolution tiles, as LLaVA-NeXT does at 336 px
    cfg = LlavaNextConfig(
        **_llava_config(tok),
        image_grid_pinpoints=pinpoints,
    )
    ip = LlavaNextImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints
    )
    proc = LlavaNextProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return LlavaNextForConditionalGeneration(cfg), proc


# PaliGemma has no chat: the prompt is the text; its processor puts the image tokens and BOS in front
PALIGEMMA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% for c in message['content'] %}"
    "{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
)


def _build_paligemma() -> tuple[Any, Any]:
    from transformers import (
        GemmaConfig,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessor,
        SiglipVisionConfig,
    )

    tok = train_tokenizer(
        ["<pad>", "<eos>", "<bos>", "<unk>", "<image>"],
        named={"image_token": "<image>"},
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        unk="<unk>",
        chat_template=PALIGEMMA_CHAT_TEMPLATE,
    )
    cfg = PaliGemmaConfig(
        vision_config=SiglipVisionConfig(**_VISION, image_size=32, patch_size=8, projection_dim=64),
        text_config=GemmaConfig(
            vocab_size=len(tok),
            **_GEMMA_TEXT,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        ),
        image_token_index=tok.image_token_id,
        projection_dim=64,
    )
    cfg.text_config.num_image_tokens = 16
    ip = SiglipImageProcessor(size={"height": 32, "width": 32})
    ip.image_seq_length = 16
    proc = PaliGemmaProcessor(image_processor=ip, tokenizer=tok, chat_template=PALIGEMMA_CHAT_TEMPLATE)
    return PaliGemmaForConditionalGeneration(cfg), proc


def _build_qwen(v25: bool) -> tuple[Any, Any]:
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    specials = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
    ]
    tok = train_tokenizer(specials, eos="<|im_end|>", pad="<|endoftext|>", chat_template=QWEN_CHAT_TEMPLATE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    text = {
        "vocab_size": len(tok),
        **_TEXT,
        "bos_token_id": None,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
    }
    common = {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }
    sizes = {
        "min_pixels": 56 * 56,
        "max_pixels": 112 * 112,
        "patch_size": 14,
        "merge_size": 2,
        "temporal_patch_size": 2,
    }
    ip = Qwen2VLImageProcessor(**sizes)
    vp = Qwen2VLVideoProcessor(**sizes)
    if v25:
        from transformers import Qwen2_5_VLConfig as Config
        from transformers import Qwen2_5_VLForConditionalGeneration as Model
        from transformers import Qwen2_5_VLProcessor as Processor

        vision = {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [1],
        }
    else:
        from transformers import Qwen2VLConfig as Config  # type: ignore[assignment]
        from transformers import Qwen2VLForConditionalGeneration as Model  # type: ignore[assignment]
        from transformers import Qwen2VLProcessor as Processor  # type: ignore[assignment]

        vision = {
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": 64,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        }
    cfg = Config(
        text_config=text,
        vision_config=vision,
        **common,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    proc = Processor(image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=QWEN_CHAT_TEMPLATE)
    return Model(cfg), proc


def _build_gemma3() -> tuple[Any, Any]:
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    tok = train_tokenizer(
        [
            "<pad>",
            "<eos>",
            "<bos>",
            "<unk>",
            "<start_of_turn>",
            "<end_of_turn>",
            "<start_of_image>",
            "<end_of_image>",
            "<image_soft_token>",
        ],
        named={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
        bos="<bos>",
        eos="<end_of_turn>",
        pad="<pad>",
        unk="<unk>",
        chat_template=GEMMA_CHAT_TEMPLATE,
    )
    text = Gemma3TextConfig(
        vocab_size=len(tok),
        **_GEMMA_TEXT,
        query_pre_attn_scalar=16,
        sliding_window=64,
        max_position_embeddings=4096,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    cfg = Gemma3Config(
        text_config=text,
        vision_config=SiglipVisionConfig(**_VISION, image_size=32, patch_size=8),
        mm_tokens_per_image=4,
        boi_token_index=tok.boi_token_id,
        eoi_token_index=tok.eoi_token_id,
        image_token_index=tok.image_token_id,
    )
    ip = Gemma3ImageProcessor(size={"height": 32, "width": 32}, do_pan_and_scan=False)
    proc = Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=4, chat_template=GEMMA_CHAT_TEMPLATE)
    return Gemma3ForConditionalGeneration(cfg), proc


def _build_ved() -> tuple[Any, Any]:
    """ViT encoder + GPT-2 decoder: a captioner that cannot answer questions."""
    from transformers import (
        GPT2Config,
        TrOCRProcessor,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessor,
    )

    tok = train_tokenizer(["<|endoftext|>", "<pad>"], bos="<|endoftext|>", eos="<|endoftext|>", pad="<pad>")
    enc = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
    )
    dec = GPT2Config(
        vocab_size=len(tok),
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id = tok.bos_token_id
    cfg.pad_token_id = tok.pad_token_id
    cfg.eos_token_id = tok.eos_token_id
    proc = TrOCRProcessor(image_processor=ViTImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok)
    model = VisionEncoderDecoderModel(config=cfg)
    model.generation_config.decoder_start_token_id = tok.bos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model, proc


def _build_idefics() -> tuple[Any, Any]:
    """IDEFICS (the Flamingo-style 9B/80B): a perceiver resampler and gated cross-attention to the image.
    Its processor has no chat template; the engine writes the instruct format itself."""
    from transformers import IdeficsConfig, IdeficsForVisionText2Text, IdeficsImageProcessor, IdeficsProcessor

    tok = train_tokenizer(
        ["<unk>", "<s>", "</s>", "<image>", "<fake_token_around_image>", "<end_of_utterance>"],
        bos="<s>",
        eos="</s>",
        pad="<unk>",
        unk="<unk>",
    )
    cfg = IdeficsConfig(
        vocab_size=len(tok),
        additional_vocab_size=0,
        hidden_size=_TEXT["hidden_size"],
        intermediate_size=_TEXT["intermediate_size"],
        num_hidden_layers=_TEXT["num_hidden_layers"],
        num_attention_heads=_TEXT["num_attention_heads"],
        cross_layer_interval=1,
        use_resampler=True,
        vision_config={
            "embed_dim": _VISION["hidden_size"],
            "image_size": 32,
            "patch_size": 8,
            "num_hidden_layers": _VISION["num_hidden_layers"],
            "num_attention_heads": _VISION["num_attention_heads"],
            "intermediate_size": _VISION["intermediate_size"],
        },
        perceiver_config={
            "use_resampler": True,
            "resampler_n_latents": 4,
            "resampler_depth": 1,
            "resampler_n_heads": 2,
            "resampler_head_dim": 8,
        },
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = IdeficsForVisionText2Text(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, IdeficsProcessor(image_processor=IdeficsImageProcessor(image_size=32), tokenizer=tok)


BUILDERS: dict[str, Callable[[], tuple[Any, Any]]] = {
    "idefics": _build_idefics,
    "smolvlm": lambda: _build_idefics3_style("smolvlm"),
    "idefics3": lambda: _build_idefics3_style("idefics3"),
    "llava": _build_llava,
    "llava_next": _build_llava_next,
    "paligemma": _build_paligemma,
    "qwen2_vl": lambda: _build_qwen(False),
    "qwen2_5_vl": lambda: _build_qwen(True),
    "gemma3": _build_gemma3,
    "ved": _build_ved,
}


def families() -> list[str]:
    return sorted(BUILDERS)


def build_tiny(family: str, out: Path, *, seed: int = 0) -> Path:
    """Build, save and return the folder of a tiny random checkpoint of `family`."""
    if family not in BUILDERS:
        raise ValueError(f"unknown tiny model family {family!r}; choose one of {', '.join(families())}")
    import torch

    torch.manual_seed(seed)
    model, proc = BUILDERS[family]()
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    proc.save_pretrained(out)
    (out / TINY_MARKER).write_text(
        json.dumps(
            {
                "family": family,
                "stands_in_for": STANDS_IN_FOR.get(family, ""),
                "seed": seed,
                "note": "randomly initialised: for tests and offline demos only, its answers mean nothing",
            },
            indent=2,
        )
    )
    return out


def tiny_info(folder: Path) -> dict[str, Any] | None:
    marker = folder / TINY_MARKER
    if not marker.is_file():
        return None
    data: dict[str, Any] = json.loads(marker.read_text())
    return data
