"""Checkpoints that bring their own modelling code (`trust_remote_code`), laid out like vikhyatk/moondream2.

Such a checkpoint has no processor and no chat template, so the stock engine cannot drive it; this plugin
(`NIGHTREAD_INFERENCE__ENGINE=remote_code`) can. The folder holds

    config.json         its own model_type; auto_map {"AutoConfig": "<configuration module>.<Config>",
                        "AutoModelForCausalLM": "<modeling module>.<Model>"}; optionally prompt_template
                        (with <image> before {text}; default MoonDream's "<image>\\n\\nQuestion: {text}\\n\\nAnswer:")
    *.py                the modelling files auto_map names (and what they import relatively)
    model.safetensors   the weights, under the names that code gives them
    tokenizer files     a tokenizer AutoTokenizer loads

The code runs ONLY when the configured model is named in `inference.trust_remote_code_for`
(NIGHTREAD_INFERENCE__TRUST_REMOTE_CODE_FOR; the wiring turns it into `EngineOptions.trust_remote_code`);
otherwise loading is refused with a ConfigurationError that says so. transformers copies the files into its
dynamic-module cache (HF_MODULES_CACHE) and imports them from there.

What the model must offer (MoonDream2's 2024 revisions do): `encode_image(images) -> (B, N, hidden)` image
embeddings, its own preprocessing included, and `text_model`, a transformers causal LM whose input embeddings
take those image embeddings. The engine is the seed plugins' composition (`composed.py`): the prompt's text
around `<image>` is embedded on each side of the image's embeddings; closed questions are scored from the
text model's logits after a shared prefix KV cache (P(yes) = softmax over the yes/no tokens); captions and
open answers are generated greedily with the token cap and stop strings; an image is encoded once (LRU).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from integrations.errors import ConfigurationError
from integrations.vlm.engine import EngineOptions, resolve_device, resolve_dtype
from integrations.vlm.plugins import composed
from integrations.vlm.plugins.composed import (
    HALF,
    ComposedVlmEngine,
    ImageSpec,
    LoadedArchitecture,
    PromptSpec,
    VlmParts,
)

ENGINE = "remote_code"
ALLOW_LIST_SETTING = "inference.trust_remote_code_for (NIGHTREAD_INFERENCE__TRUST_REMOTE_CODE_FOR, a JSON list)"
MOONDREAM_PROMPT = "<image>\n\nQuestion: {text}\n\nAnswer:"  # after the BOS token
TEMPLATE_PACKAGE = Path(__file__).resolve().parent / "tinymoondream"
TINY_FILES = ("configuration_tinymoondream.py", "modeling_tinymoondream.py")
STANDS_IN_FOR = "vikhyatk/moondream2 (2024 revisions: SigLIP-style ViT + MLP projection + Phi, its own code)"


class RemoteCodeVlmEngine(ComposedVlmEngine):
    """The composition over a remote-code model: its own `encode_image` makes the image embeddings."""

    def _encode(self, images: Sequence[Any]) -> list[Any]:
        t0 = time.perf_counter()
        features = self.model.encode_image(list(images))
        self._vision_s += time.perf_counter() - t0
        return list(features.to(self.device, self.dtype).unbind(0))


def remote_entry(config: dict[str, Any], folder: Path) -> str:
    """The class auto_map names for AutoModelForCausalLM, or a ConfigurationError saying the folder has none."""
    auto_map = config.get("auto_map")
    entry = auto_map.get("AutoModelForCausalLM") if isinstance(auto_map, dict) else None
    if not isinstance(entry, str):
        raise ConfigurationError(
            f"{folder}/config.json has no auto_map.AutoModelForCausalLM: not a remote-code checkpoint "
            f"(engine {ENGINE!r} loads those; others load with the engine 'transformers' or their plugin)"
        )
    return entry


def load(checkpoint: str, options: EngineOptions) -> RemoteCodeVlmEngine:
    """The `nightread.engines` entry point `remote_code`: refuses unless the checkpoint is allow-listed."""
    folder = Path(checkpoint).expanduser()
    if not folder.is_dir():
        raise ConfigurationError(
            f"engine {ENGINE!r} loads a local checkpoint folder; {checkpoint!r} is not one (see docs/model.md)"
        )
    config = composed.read_config(folder)
    entry = remote_entry(config, folder)
    if not options.trust_remote_code:
        raise ConfigurationError(
            f"checkpoint {folder.name} runs its own code ({entry}), which nightread runs only for models named in "
            f"{ALLOW_LIST_SETTING}: add the model setting's value there to allow it"
        )
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    dtype = resolve_dtype(options.dtype, resolve_device(options.device))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
    except (OSError, ValueError, ImportError) as exc:
        raise ConfigurationError(f"remote code of {folder.name} cannot be loaded: {type(exc).__name__}: {exc}") from exc
    missing = [name for name in ("encode_image", "text_model") if not hasattr(model, name)]
    if missing:
        raise ConfigurationError(
            f"{entry} has no {' or '.join(missing)}: engine {ENGINE!r} drives MoonDream2-style models "
            "(encode_image(images) -> image embeddings, text_model: a causal LM)"
        )
    language_model = model.text_model
    if options.adapter:  # a LoRA fine-tune of the text model, merged
        composed.apply_lora(language_model, options.adapter, merge=True)
    template = str(getattr(model.config, "prompt_template", None) or MOONDREAM_PROMPT)
    bos = tokenizer.bos_token or ""
    prompt = PromptSpec(
        template=template if template.startswith(bos) else bos + template,
        stop_tokens=tuple(t for t in (tokenizer.eos_token,) if t),
    )
    size = int(getattr(model.config, "vision_config", {}).get("image_size", 378))
    loaded = LoadedArchitecture(
        parts=VlmParts(
            root=model,
            language_model=language_model,
            vision_tower=getattr(model, "vision_encoder", model),
            encode=model.encode_image,
        ),
        prompt=prompt,
        image=ImageSpec(size=size, mean=HALF, std=HALF),  # for reference only: the model preprocesses itself
        adapter=options.adapter,
    )
    return RemoteCodeVlmEngine(
        checkpoint=str(folder),
        family=str(config.get("model_type", ENGINE)),
        loaded=loaded,
        tokenizer=tokenizer,
        options=options,
    )


def build_tiny_remote_code(out: Path, seed: int = 0) -> Path:
    """A tiny random MoonDream2-style checkpoint: config.json with auto_map, the two modelling files (copied
    from `tinymoondream/`), weights and a tokenizer. Loading it needs `trust_remote_code`."""
    import torch
    import transformers

    from integrations.vlm.plugins.tinymoondream.configuration_tinymoondream import TinyMoondreamConfig
    from integrations.vlm.plugins.tinymoondream.modeling_tinymoondream import TinyMoondreamForCausalLM
    from integrations.vlm.tiny import train_tokenizer

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    tok = train_tokenizer(["<|endoftext|>"], bos="<|endoftext|>", eos="<|endoftext|>", pad="<|endoftext|>")
    text = {
        "vocab_size": len(tok),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "partial_rotary_factor": 0.5,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    config = TinyMoondreamConfig(
        text_config=text,
        vision_config={"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 2, "mlp_ratio": 2},
        auto_map={
            "AutoConfig": "configuration_tinymoondream.TinyMoondreamConfig",
            "AutoModelForCausalLM": "modeling_tinymoondream.TinyMoondreamForCausalLM",
        },
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = TinyMoondreamForCausalLM(config).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    for name in TINY_FILES:
        shutil.copyfile(TEMPLATE_PACKAGE / name, out / name)
    tok.save_pretrained(str(out))
    composed.write_tiny_marker(out, family="tinymoondream", stands_in_for=STANDS_IN_FOR, seed=seed)
    return out
