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


def _build_smolvlm() -> tuple[Any, Any]:
    from transformers import (
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMImageProcessor,
        SmolVLMProcessor,
        SmolVLMVideoProcessor,
    )

    rowcol = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    tok = train_tokenizer(
        [
            "<|endoftext|>",
            "<|im_start|>",
            "<end_of_utterance>",
            "<image>",
            "<fake_token_around_image>",
            "<global-img>",
            *rowcol,
        ],
        bos="<|im_start|>",
        eos="<end_of_utterance>",
        pad="<|endoftext|>",
        chat_template=SMOLVLM_CHAT_TEMPLATE,
    )
    cfg = SmolVLMConfig(
        vision_config={**_VISION, "image_size": 32, "patch_size": 8},
        text_config={
            "model_type": "llama",
            "vocab_size": len(tok),
            **_TEXT,
            "pad_token_id": tok.pad_token_id,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
        },
        scale_factor=2,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    image_processor = SmolVLMImageProcessor(
        size={"longest_edge": 64},
        max_image_size={"longest_edge": 32},
        do_image_splitting=True,
    )
    video_processor = SmolVLMVideoProcessor(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    proc = SmolVLMProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        video_processor=video_processor,
        image_seq_len=4,
        chat_template=SMOLVLM_CHAT_TEMPLATE,
    )
    model = SmolVLMForConditionalGeneration(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, proc


BUILDERS: dict[str, Callable[[], tuple[Any, Any]]] = {
    "smolvlm": _build_smolvlm,
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
