"""The one composition behind the seed-model plugins: a vision tower, a connector and a causal decoder LM.

LLaVA-style: an image becomes N token embeddings (vision tower → connector/projector), inserted where the
prompt template has `<image>`; the text on each side is tokenized on its own (as LLaVA's
`tokenizer_image_token` does), so no image token has to exist in the vocabulary. The four architecture
modules (`tinyllava`, `biomedclip_llama`, `med_moe`, `medvint`) only build their modules with the
published checkpoints' structure and key names and say how their prompt and image are prepared; this
module runs them all:

- the image features of an image are computed once and kept in a small LRU keyed by the image's pixels,
  so a caption, the closed questions and the open questions of one image run the vision tower once;
- closed questions are scored, not generated: the prefix (system text, image tokens, context) runs once
  and its KV cache is kept; the questions follow packed in one row with a block-diagonal 4D mask (each
  sees the prefix and its own tokens; positions restart after the prefix), and P(yes) is the softmax over
  every yes/no token variant at each question's last token, as `integrations/vlm/engine.py` does;
- captions and open answers are generated greedily with a token cap and stop strings.

A checkpoint is a folder: `config.json` (the architecture's sub-configs), the weights under their
published key names (`model.safetensors`, a sharded `model.safetensors.index.json`, or `pytorch_model.bin`)
and the tokenizer files.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from integrations.errors import ConfigurationError
from integrations.vlm.engine import NO_WORDS, SENTINEL, YES_WORDS, EngineOptions, resolve_device, resolve_dtype

log = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
TEXT_SLOT = "{text}"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
FEATURE_CACHE_SIZE = 32  # images whose projected features are kept (LRU)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


class ImageSpec(BaseModel):
    """How pixels are prepared for the vision tower (what the checkpoint's image processor does)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: int = Field(ge=8, le=4096, description="side of the square input, pixels")
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # squash: resize to size x size (SigLIP, MedVInT); pad: pad to a square with the mean colour, then resize
    # (LLaVA's image_aspect_ratio=pad); center_crop: shortest edge to size, then a centre crop (CLIP, open_clip)
    resize: Literal["squash", "pad", "center_crop"] = "squash"


@dataclass(frozen=True)
class PromptSpec:
    """The conversation format: `template` holds `<image>` (before) and `{text}` (the user's text)."""

    template: str
    stop_tokens: tuple[str, ...] = ()  # tokens that end a generation besides the tokenizer's eos

    def validate(self) -> None:
        if IMAGE_PLACEHOLDER not in self.template or TEXT_SLOT not in self.template:
            raise ConfigurationError(f"prompt template must contain {IMAGE_PLACEHOLDER} and {TEXT_SLOT}")
        if self.template.index(IMAGE_PLACEHOLDER) > self.template.index(TEXT_SLOT):
            raise ConfigurationError("prompt template must put the image before the text (the shared prefix)")

    def render(self, text: str) -> str:
        return self.template.replace(TEXT_SLOT, text)


@dataclass
class VlmParts:
    """What the composition needs from an architecture."""

    root: Any  # the nn.Module whose state_dict() keys are the published checkpoint's
    language_model: Any  # a transformers causal LM (inputs_embeds, a KV cache, logits_to_keep)
    vision_tower: Any  # the module that encodes pixels (one forward per batch of new images)
    encode: Callable[[Any], Any]  # pixel_values (B, 3, H, W) -> image token embeddings (B, N, hidden)


@dataclass
class LoadedArchitecture:
    parts: VlmParts
    prompt: PromptSpec
    image: ImageSpec
    adapter: str | None = None  # the LoRA adapter applied to the language model, for provenance


BuildFn = Callable[[Path, dict[str, Any], EngineOptions], LoadedArchitecture]


# --- checkpoint files ----------------------------------------------------------------------------------


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise ConfigurationError(f"checkpoint {folder} has no {CONFIG_FILE}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigurationError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigurationError(f"{path} must hold a JSON object")
    return data


def require(config: dict[str, Any], key: str, kind: type | tuple[type, ...], *, where: str = CONFIG_FILE) -> Any:
    """A config field, or a ConfigurationError that names it."""
    if key not in config:
        raise ConfigurationError(f"{where}: field {key!r} is missing")
    value = config[key]
    if not isinstance(value, kind):
        raise ConfigurationError(f"{where}: field {key!r} must be {_kind_name(kind)}, not {type(value).__name__}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))


def image_spec(data: dict[str, Any], *, where: str) -> ImageSpec:
    try:
        return ImageSpec.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "image_processor"
        raise ConfigurationError(f"{where}: image_processor field {field!r}: {first['msg']}") from exc


def read_state_dict(folder: Path) -> dict[str, Any]:
    """All weights of a checkpoint folder: one or sharded safetensors files, or PyTorch .bin files."""
    from safetensors.torch import load_file

    torch = _torch()
    single, index = folder / WEIGHTS_FILE, folder / f"{WEIGHTS_FILE}.index.json"
    bin_single, bin_index = folder / "pytorch_model.bin", folder / "pytorch_model.bin.index.json"
    if single.is_file():
        return dict(load_file(str(single)))
    if index.is_file() or bin_index.is_file():
        shards = sorted(set(json.loads((index if index.is_file() else bin_index).read_text())["weight_map"].values()))
        state: dict[str, Any] = {}
        for shard in shards:
            path = folder / shard
            if path.suffix == ".safetensors":
                state.update(load_file(str(path)))
            else:
                state.update(torch.load(path, map_location="cpu", weights_only=True))
        return state
    if bin_single.is_file():
        loaded = torch.load(bin_single, map_location="cpu", weights_only=True)
        return dict(loaded.get("state_dict", loaded)) if isinstance(loaded, dict) else dict(loaded)
    raise ConfigurationError(f"checkpoint {folder} has no weights ({WEIGHTS_FILE}, its index, or pytorch_model.bin)")


Renames = Sequence[tuple[str, str]]  # (published key prefix, this process's module prefix)


def vision_renames(prefix: str, model: Any) -> list[tuple[str, str]]:
    """transformers 5.2x flattened its CLIP / SigLIP vision models (no `vision_model.` level; its own
    from_pretrained renames published weights on load): the published names under `prefix` → this release's."""
    return [] if hasattr(model, "vision_model") else [(f"{prefix}vision_model.", prefix)]


def rename_keys(state: dict[str, Any], renames: Renames) -> dict[str, Any]:
    """Each key under a rename's first prefix moved under its second (the first matching rename wins)."""
    if not renames:
        return state
    out = {}
    for key, value in state.items():
        for old, new in renames:
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        out[key] = value
    return out


def load_weights(
    root: Any, state: dict[str, Any], *, ignore_prefixes: tuple[str, ...] = (), renames: Renames = ()
) -> list[str]:
    """Load `state` (published key names) into `root` by name. Unexpected keys are an error (the layout is not
    this architecture's); the missing keys are returned for the caller to fill or refuse (`require_complete`)."""
    state = {k: v for k, v in state.items() if not k.startswith(ignore_prefixes)} if ignore_prefixes else state
    missing, unexpected = root.load_state_dict(rename_keys(state, renames), strict=False)
    if unexpected:
        raise ConfigurationError(
            f"{len(unexpected)} weight(s) do not belong to this architecture, e.g. {', '.join(sorted(unexpected)[:3])}"
        )
    return sorted(missing)


def require_complete(missing: Sequence[str]) -> None:
    if missing:
        raise ConfigurationError(f"{len(missing)} weight(s) missing from the checkpoint, e.g. {', '.join(missing[:3])}")


def published_state(root: Any, renames: Renames = ()) -> dict[str, Any]:
    """The root's state dict under the published key names (contiguous copies, safe to save)."""
    state = {k: v.detach().contiguous().clone() for k, v in root.state_dict().items()}
    return rename_keys(state, [(new, old) for old, new in renames])


def save_weights(state: dict[str, Any], folder: Path) -> None:
    """A state dict as the folder's `model.safetensors`."""
    from safetensors.torch import save_file

    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})


def write_config(folder: Path, config: dict[str, Any]) -> None:
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def write_tiny_marker(folder: Path, *, family: str, stands_in_for: str, seed: int) -> None:
    """The marker `resolve_checkpoint` reads: the folder is labelled a tiny random stand-in."""
    from integrations.vlm.tiny import TINY_MARKER

    (folder / TINY_MARKER).write_text(
        json.dumps(
            {
                "family": family,
                "stands_in_for": stands_in_for,
                "seed": seed,
                "note": "randomly initialised: for tests and offline demos only, its answers mean nothing",
            },
            indent=2,
        )
    )


@contextlib.contextmanager
def skip_init(enabled: bool = True) -> Iterator[None]:
    """Build modules without random initialisation (their weights are loaded right after)."""
    if not enabled:
        yield
        return
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: initialise, then overwrite
        yield
        return
    with no_init_weights():
        yield


def causal_lm(text_config: dict[str, Any]) -> Any:
    """A transformers causal LM from a config dict with its `model_type` (phi, llama, …)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = dict(text_config)
    model_type = require(config, "model_type", str, where="text_config")
    config.pop("model_type")
    for key in ("architectures", "transformers_version", "_name_or_path", "auto_map"):
        config.pop(key, None)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config))


def vision_model(vision_config: dict[str, Any], *, where: str) -> Any:
    """A transformers vision encoder (CLIPVisionModel, SiglipVisionModel, …) from its config dict."""
    from transformers import AutoConfig, AutoModel

    config = dict(vision_config)
    model_type = require(config, "model_type", str, where=where)
    config.pop("model_type")
    for key in ("architectures", "transformers_version", "_name_or_path", "model_name_or_path", "model_name_or_path2"):
        config.pop(key, None)
    return AutoModel.from_config(AutoConfig.for_model(model_type, **config))


def load_tokenizer(folder: Path) -> Any:
    """The checkpoint's tokenizer. Its `config.json` is not a transformers model config (model_type
    tinyllava, moe_llava_phi, …), so the tokenizer class comes from tokenizer_config.json first."""
    from transformers import AutoTokenizer, PretrainedConfig

    try:
        try:
            return AutoTokenizer.from_pretrained(str(folder), config=PretrainedConfig())
        except ValueError:  # tokenizer_config.json names no class: let transformers look further
            return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"checkpoint {folder} has no usable tokenizer: {exc}") from exc


def apply_lora(model: Any, adapter: str, *, merge: bool) -> Any:
    """A PEFT LoRA adapter on `model`, in place: merged into its weights, or left active (LoRA layers inside
    its modules). Either way the returned module is `model` itself, whose forward is now the adapted one."""
    try:
        from peft import PeftModel
    except ImportError as exc:
        raise ConfigurationError("a LoRA adapter needs peft: pip install 'nightread[inference]'") from exc
    try:
        peft_model = PeftModel.from_pretrained(model, adapter)
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"adapter {adapter!r} cannot be applied: {type(exc).__name__}: {exc}") from exc
    return peft_model.merge_and_unload() if merge else peft_model.get_base_model()


def _torch() -> Any:
    import torch

    return torch


# --- pixels --------------------------------------------------------------------------------------------


def preprocess(images: Sequence[Any], spec: ImageSpec) -> Any:
    """(B, 3, size, size) float32 pixel values, normalised as the checkpoint's image processor does."""
    import numpy as np
    from PIL import Image

    torch = _torch()
    out = []
    for image in images:
        im = image.convert("RGB")
        if spec.resize == "pad":
            side = max(im.size)
            fill = tuple(int(m * 255) for m in spec.mean)
            square = Image.new("RGB", (side, side), fill)
            square.paste(im, ((side - im.width) // 2, (side - im.height) // 2))
            im = square
        if spec.resize == "center_crop":
            scale = spec.size / min(im.size)
            w, h = max(spec.size, round(im.width * scale)), max(spec.size, round(im.height * scale))
            im = im.resize((w, h), Image.Resampling.BICUBIC)
            left, top = (w - spec.size) // 2, (h - spec.size) // 2
            im = im.crop((left, top, left + spec.size, top + spec.size))
        else:
            im = im.resize((spec.size, spec.size), Image.Resampling.BICUBIC)
        arr = np.asarray(im, dtype=np.float32) / 255.0
        arr = (arr - np.asarray(spec.mean, dtype=np.float32)) / np.asarray(spec.std, dtype=np.float32)
        out.append(torch.from_numpy(arr.transpose(2, 0, 1).copy()))
    return torch.stack(out)


def image_key(image: Any) -> str:
    """The identity of an image's pixels (the feature cache's key: equal pixels share features)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()


# --- the engine ----------------------------------------------------------------------------------------


class ComposedVlmEngine:
    """An `Engine` (integrations/vlm/engine.py) for a vision tower + connector + decoder LM checkpoint.
    Thread-safe: calls are serialised."""

    captions_only = False

    def __init__(
        self,
        *,
        checkpoint: str,
        family: str,
        loaded: LoadedArchitecture,
        tokenizer: Any,
        options: EngineOptions,
        feature_cache_size: int = FEATURE_CACHE_SIZE,
    ) -> None:
        torch = _torch()
        self._torch = torch
        self.checkpoint = checkpoint
        self.family = family
        self.device = resolve_device(options.device)
        self.dtype = resolve_dtype(options.dtype, self.device)
        # the adapter actually applied is what provenance records (LocalAnnotator reads options.adapter)
        self.options = replace(options, adapter=loaded.adapter) if loaded.adapter else options
        self.parts = loaded.parts
        self.prompt = loaded.prompt
        self.image_spec = loaded.image
        self.prompt.validate()
        self.tokenizer = tokenizer
        self.parts.root.to(device=self.device, dtype=self.dtype).eval()
        self.model = self.parts.root
        self.language_model = self.parts.language_model
        self.vision_tower = self.parts.vision_tower
        params = inspect.signature(self.language_model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._embed = self.language_model.get_input_embeddings()
        self.yes_ids, self.no_ids = answer_token_ids(tokenizer)
        if not self.yes_ids or not self.no_ids:
            raise ConfigurationError(f"the tokenizer of {family} has no single token for yes/no")
        self.eos_ids = self._stop_token_ids()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self._lock = threading.Lock()
        self._features: OrderedDict[str, Any] = OrderedDict()
        self._feature_cache_size = feature_cache_size
        self._vision_s = 0.0

    @classmethod
    def from_folder(cls, checkpoint: str, options: EngineOptions, *, family: str, build: BuildFn) -> ComposedVlmEngine:
        """Read `config.json`, build the architecture with its weights, load the tokenizer."""
        folder = Path(checkpoint).expanduser()
        if not folder.is_dir():
            raise ConfigurationError(
                f"engine {family!r} loads a local checkpoint folder; {checkpoint!r} is not one (see docs/model.md)"
            )
        config = read_config(folder)
        loaded = build(folder, config, options)
        if options.adapter and loaded.adapter is None:  # a LoRA fine-tune of the language model, merged
            apply_lora(loaded.parts.language_model, options.adapter, merge=True)
            loaded.adapter = options.adapter
        tokenizer = load_tokenizer(folder)
        return cls(checkpoint=str(folder), family=family, loaded=loaded, tokenizer=tokenizer, options=options)

    def _stop_token_ids(self) -> list[int]:
        ids: list[int] = []
        if self.tokenizer.eos_token_id is not None:
            ids.append(int(self.tokenizer.eos_token_id))
        vocab = self.tokenizer.get_vocab()
        ids += [int(vocab[t]) for t in self.prompt.stop_tokens if t in vocab and vocab[t] not in ids]
        if not ids:
            raise ConfigurationError(f"the tokenizer of {self.family} has no end-of-text token")
        return ids

    # --- text and images ---------------------------------------------------------------------------------
    def split_prompt(self, context: str) -> tuple[str, str]:
        """(prefix with the image and `context`, suffix template that follows each question)."""
        full = self.prompt.render(f"{context}\n{SENTINEL}" if context else SENTINEL)
        prefix, _, suffix = full.partition(SENTINEL)
        return prefix, suffix

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def _embed_ids(self, ids: list[int]) -> Any:
        torch = self._torch
        return self._embed(torch.tensor(ids, dtype=torch.long, device=self.device))

    def _embed_prompt(self, text: str, features: Any) -> Any:
        """(L, hidden): the text before `<image>`, the image's token embeddings, the text after it."""
        before, _, after = text.partition(IMAGE_PLACEHOLDER)
        return self._torch.cat(
            [self._embed_ids(self._ids(before)), features.to(self.dtype), self._embed_ids(self._ids(after))]
        )

    def _encode(self, images: Sequence[Any]) -> list[Any]:
        """Projected image features, one (N, hidden) tensor per image, in one batched vision forward."""
        pixels = preprocess(images, self.image_spec).to(self.device, self.dtype)
        t0 = time.perf_counter()
        features = self.parts.encode(pixels)
        self._vision_s += time.perf_counter() - t0
        return list(features.unbind(0))

    def image_features(self, images: Sequence[Any]) -> list[Any]:
        """Each image's features, from the LRU where its pixels were encoded before (caption, closed and
        open questions of one image share one vision forward); the new ones in one batch."""
        keys = [image_key(im) for im in images]
        fresh: dict[str, Any] = {}
        todo: dict[str, Any] = {}
        for key, im in zip(keys, images, strict=True):
            if key in self._features:
                self._features.move_to_end(key)
                fresh[key] = self._features[key]
            else:
                todo.setdefault(key, im)
        if todo:
            fresh.update(zip(todo, self._encode(list(todo.values())), strict=True))
            for key in todo:
                self._features[key] = fresh[key]
            while len(self._features) > self._feature_cache_size:
                self._features.popitem(last=False)
        return [fresh[k] for k in keys]

    def _left_pad(self, seqs: Sequence[Any]) -> tuple[Any, Any]:
        torch = self._torch
        length = max(s.shape[0] for s in seqs)
        hidden = seqs[0].shape[1]
        embeds = torch.zeros((len(seqs), length, hidden), dtype=self.dtype, device=self.device)
        mask = torch.zeros((len(seqs), length), dtype=torch.long, device=self.device)
        for i, s in enumerate(seqs):
            embeds[i, length - s.shape[0] :] = s
            mask[i, length - s.shape[0] :] = 1
        return embeds, mask

    # --- tasks ---------------------------------------------------------------------------------------------
    def generate(self, image: Any, prompt: str, *, max_new_tokens: int, min_new_tokens: int = 0) -> str:
        """Greedy generation for a caption or an open question (`prompt` is the user's text)."""
        return self.generate_batch([image], [prompt], max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens)[0]

    def generate_batch(
        self, images: Sequence[Any], prompts: Sequence[str], *, max_new_tokens: int, min_new_tokens: int = 0
    ) -> list[str]:
        """Greedy generation for several images in one left-padded `generate` call."""
        torch = self._torch
        with self._lock, torch.inference_mode():
            features = self.image_features(images)
            seqs = [self._embed_prompt(self.prompt.render(p), f) for p, f in zip(prompts, features, strict=True)]
            embeds, mask = self._left_pad(seqs)
            stops = list(self.options.stop_strings) if not min_new_tokens else []
            out = self.language_model.generate(
                inputs_embeds=embeds,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                min_new_tokens=min_new_tokens,
                do_sample=False,
                eos_token_id=self.eos_ids,
                pad_token_id=self.pad_id,
                **({"stop_strings": stops, "tokenizer": self.tokenizer} if stops else {}),
            )
            texts = self.tokenizer.batch_decode(out, skip_special_tokens=True)
        return [_printable(_cut(str(t), self.options.stop_strings)) for t in texts]

    def p_yes_shared(
        self, image: Any, context: str, questions: Sequence[str], *, temperature: float = 1.0
    ) -> tuple[list[float], dict[str, float]]:
        """P(yes) for each question with the image + context prefix encoded once."""
        return self.p_yes_shared_batch([(image, context, questions)], temperature=temperature)[0]

    def p_yes_shared_batch(
        self, items: Sequence[tuple[Any, str, Sequence[str]]], *, temperature: float = 1.0
    ) -> list[tuple[list[float], dict[str, float]]]:
        """P(yes) for the questions of several images in two forwards: the prefixes in one left-padded batch,
        then each image's questions packed in its own row after its cached prefix."""
        results: list[tuple[list[float], dict[str, float]]] = [([], {}) for _ in items]
        asked = [i for i, (_, _, qs) in enumerate(items) if qs]
        if asked:
            for i, result in zip(asked, self._p_yes_packed([items[i] for i in asked], temperature), strict=True):
                results[i] = result
        return results

    def _p_yes_packed(
        self, items: Sequence[tuple[Any, str, Sequence[str]]], temperature: float
    ) -> list[tuple[list[float], dict[str, float]]]:
        torch = self._torch
        with self._lock, torch.inference_mode():
            t0 = time.perf_counter()
            self._vision_s = 0.0
            splits = [self.split_prompt(ctx) for _, ctx, _ in items]
            features = self.image_features([im for im, _, _ in items])
            seqs = [self._embed_prompt(prefix, f) for (prefix, _), f in zip(splits, features, strict=True)]
            embeds, mask = self._left_pad(seqs)
            vision_s = self._vision_s
            t_pre = time.perf_counter()
            out = self.language_model(
                inputs_embeds=embeds,
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                use_cache=True,
                logits_to_keep=1,
            )
            t_end = time.perf_counter()
            n = len(items)
            per_ms = {
                "preprocess_ms": (t_pre - t0 - vision_s) * 1000 / n,
                "vision_ms": vision_s * 1000 / n,
                "prefix_ms": (t_end - t_pre) * 1000 / n,
            }
            t1 = time.perf_counter()
            rows = [
                [self._ids(q + suffix_tpl) for q in qs]
                for (_, _, qs), (_, suffix_tpl) in zip(items, splits, strict=True)
            ]
            probs = self._score_packed_rows(mask, _cache_of(out), rows, temperature)
            scoring_ms = (time.perf_counter() - t1) * 1000
        total_q = max(1, sum(len(r) for r in rows))
        return [(p, {**per_ms, "scoring_ms": scoring_ms * len(r) / total_q}) for p, r in zip(probs, rows, strict=True)]

    def _score_packed_rows(
        self, prefix_mask: Any, cache: Any, rows: list[list[list[int]]], temperature: float
    ) -> list[list[float]]:
        """Each row's questions packed after its (left-padded) cached prefix, a block-diagonal 4D mask letting
        each question see the prefix and its own earlier tokens only; pad tokens attend to themselves."""
        torch = self._torch
        n, p_len = prefix_mask.shape
        total = max(sum(len(q) for q in r) for r in rows)
        ids = torch.full((n, total), self.pad_id, dtype=torch.long, device=self.device)
        positions = torch.zeros((n, total), dtype=torch.long, device=self.device)
        allowed = torch.zeros((n, total, p_len + total), dtype=torch.bool, device=self.device)
        real_prefix = prefix_mask.bool()
        prefix_len = real_prefix.sum(1)
        lasts: list[list[int]] = []
        for b, r in enumerate(rows):
            flat = [t for q in r for t in q]
            ids[b, : len(flat)] = torch.tensor(flat, dtype=torch.long, device=self.device)
            start, row_last = 0, []
            for q in r:
                span = slice(start, start + len(q))
                positions[b, span] = int(prefix_len[b]) + torch.arange(len(q), device=self.device)
                allowed[b, span, :p_len] = real_prefix[b]
                allowed[b, span, p_len + start : p_len + start + len(q)] = torch.tril(
                    torch.ones((len(q), len(q)), dtype=torch.bool, device=self.device)
                )
                start += len(q)
                row_last.append(start - 1)
            for j in range(start, total):
                allowed[b, j, p_len + j] = True
            lasts.append(row_last)
        mask = torch.zeros((n, 1, total, p_len + total), dtype=self.dtype, device=self.device)
        mask.masked_fill_(~allowed.view(n, 1, total, p_len + total), torch.finfo(self.dtype).min)
        keep = torch.unique(torch.tensor([i for row in lasts for i in row], device=self.device))
        out = self.language_model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=keep,
            **{self._cache_arg: cache},
        )
        return [
            self._p_yes(
                out.logits[b, torch.searchsorted(keep, torch.tensor(lasts[b], device=self.device))], temperature
            )
            for b in range(n)
        ]

    def p_yes_full(self, image: Any, context: str, question: str, *, temperature: float = 1.0) -> float:
        """The same probability from one forward of the whole sequence, without a KV cache or the feature
        cache (the reference the shared scoring is checked against)."""
        torch = self._torch
        prefix, suffix_tpl = self.split_prompt(context)
        with self._lock, torch.inference_mode():
            features = self._encode([image])[0]
            seq = torch.cat([self._embed_prompt(prefix, features), self._embed_ids(self._ids(question + suffix_tpl))])
            out = self.language_model(inputs_embeds=seq[None], use_cache=False, logits_to_keep=1)
            return self._p_yes(out.logits[:, -1, :], temperature)[0]

    def _p_yes(self, logits: Any, temperature: float) -> list[float]:
        torch = self._torch
        lp = torch.log_softmax(logits.float(), dim=-1)
        ly = torch.logsumexp(lp[:, self.yes_ids], dim=-1)
        ln = torch.logsumexp(lp[:, self.no_ids], dim=-1)
        return [float(p) for p in torch.sigmoid((ly - ln) / max(temperature, 1e-6)).tolist()]


def answer_token_ids(tokenizer: Any) -> tuple[list[int], list[int]]:
    """Every vocabulary entry that decodes to yes / no in any case or spacing ("Yes", " yes", "▁YES")."""
    yes, no = [], []
    special = set(getattr(tokenizer, "all_special_ids", []))
    for token, idx in tokenizer.get_vocab().items():
        if idx in special or len(token) > 8:
            continue
        word = tokenizer.convert_tokens_to_string([token]).strip().lower()
        if word in YES_WORDS:
            yes.append(idx)
        elif word in NO_WORDS:
            no.append(idx)
    return sorted(yes), sorted(no)


def _cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _cut(text: str, stops: Sequence[str]) -> str:
    for stop in stops:
        if stop:
            text = text.split(stop, 1)[0]
    return text


def _printable(text: str) -> str:
    return "".join(ch for ch in text if ch.isprintable()).strip()
