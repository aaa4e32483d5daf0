"""The VLM engine: loads a checkpoint through transformers' Auto classes and answers three kinds of task.

- captions and open questions: greedy generation with a token cap;
- closed questions: scoring, not generation. The image and the shared prompt prefix are encoded
  once; their KV cache is repeated for the K questions, which run in one batched forward; P(yes)
  is the softmax over the logits of every yes/no token variant of the tokenizer at the answer
  position, divided by the model's temperature.

The engine is what runs in-process (LocalAnnotator) and inside Triton's Python backend.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from integrations.errors import ConfigurationError, UnsupportedTask

log = logging.getLogger(__name__)

SENTINEL = "\ue000QUESTION\ue000"
YES_WORDS = frozenset({"yes"})
NO_WORDS = frozenset({"no"})


DEFAULT_STOP_STRINGS: tuple[str, ...] = ("\n",)
PACKED_FAMILIES = frozenset({"smolvlm", "idefics3", "llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "gemma3"})
IMAGE_MARK = "\x00image\x00"  # where an interleaving processor (IDEFICS) places the image in a prompt


@dataclass(frozen=True)
class EngineOptions:
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    trust_remote_code: bool = False
    adapter: str | None = None  # a PEFT LoRA adapter (folder or hub id), merged into the base for inference
    engine: str = "transformers"  # or the name of a `nightread.engines` entry point (a plugin)
    # generation of captions and open answers stops at the first of these (and the text is cut there)
    stop_strings: tuple[str, ...] = DEFAULT_STOP_STRINGS


ENGINE_ENTRY_POINTS = "nightread.engines"


@runtime_checkable
class Engine(Protocol):
    """What an engine plugin provides (entry-point group `nightread.engines`).

    A plugin's entry point is a callable `load(checkpoint: str, options: EngineOptions) -> Engine`.
    Raise `UnsupportedTask` from `p_yes_shared` if the architecture cannot answer questions.
    """

    family: str
    captions_only: bool
    dtype: Any
    options: EngineOptions

    def generate(self, image: Any, prompt: str, *, max_new_tokens: int, min_new_tokens: int = 0) -> str: ...

    def p_yes_shared(
        self, image: Any, context: str, questions: Sequence[str], *, temperature: float = 1.0
    ) -> tuple[list[float], dict[str, float]]: ...


def engine_plugins() -> dict[str, Any]:
    """Installed engine plugins by name."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENGINE_ENTRY_POINTS)}


def _torch() -> Any:
    import torch

    return torch


def resolve_device(device: str) -> str:
    torch = _torch()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> Any:
    torch = _torch()
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ConfigurationError(f"dtype must be auto, float32, bfloat16 or float16, not {dtype!r}") from None


class VlmEngine:
    """One loaded checkpoint. Thread-safe: calls are serialised (a model is one device's work)."""

    def __init__(
        self, checkpoint: str | Path, *, options: EngineOptions = EngineOptions(), revision: str | None = None
    ) -> None:
        torch = _torch()
        import transformers
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        transformers.utils.logging.disable_progress_bar()
        self.checkpoint = str(checkpoint)
        self.device = resolve_device(options.device)
        self.dtype = resolve_dtype(options.dtype, self.device)
        self.options = options
        self._lock = threading.Lock()
        kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": options.trust_remote_code}
        config = AutoConfig.from_pretrained(self.checkpoint, **kwargs)
        self.family = str(config.model_type)
        self.captions_only = self.family == "vision-encoder-decoder"
        # prefix-LM families attend bidirectionally over the whole prompt, question included: a question
        # cannot continue a cached prefix causally without changing the answer, so each is scored whole
        self.prefix_lm = self.family in ("paligemma",)
        # IDEFICS (Flamingo-style): the image enters by cross-attention; its processor takes interleaved
        # text/image lists and has no chat template
        self.idefics = self.family == "idefics"
        # score the K questions packed in one row (block-diagonal mask) where the family takes a 4D mask
        self.packed_scoring = self.family in PACKED_FAMILIES
        # Qwen2/2.5-VL M-RoPE: positions come from the model (rope_deltas), not from the attention mask
        self.mrope = self.family in ("qwen2_vl", "qwen2_5_vl")
        if self.captions_only:
            from transformers import VisionEncoderDecoderModel

            self.model = VisionEncoderDecoderModel.from_pretrained(self.checkpoint, dtype=self.dtype, **kwargs)
        else:
            self.model = AutoModelForImageTextToText.from_pretrained(self.checkpoint, dtype=self.dtype, **kwargs)
        if options.adapter:
            self.model = _merge_adapter(self.model, options.adapter)
        self.model.to(self.device).eval()
        # transformers 5.2x renamed a forward's `past_key_values` to `cache` (the old name goes in 5.40)
        self._cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self.processor = AutoProcessor.from_pretrained(self.checkpoint, **kwargs)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.yes_ids, self.no_ids = ([], []) if self.captions_only else self._answer_token_ids()
        self._vision_s = 0.0
        self._watch_vision()
        if not self.captions_only and (not self.yes_ids or not self.no_ids):
            raise ConfigurationError(f"the tokenizer of {self.family} has no single token for yes/no")
        self._torch = torch

    # --- stage timing ------------------------------------------------------------------------------------
    def _watch_vision(self) -> None:
        """Time the vision encoder (+ connector) inside any forward, by hooks on its module, so results can
        report vision and prefix separately whatever the family calls them internally."""
        inner = getattr(self.model, "model", self.model)
        tower = next(
            (getattr(inner, n) for n in ("vision_model", "vision_tower", "visual", "encoder") if hasattr(inner, n)),
            None,
        )
        if tower is None or self.captions_only:
            return
        started: list[float] = []

        def before(*_: Any) -> None:
            started.append(time.perf_counter())

        def after(*_: Any) -> None:
            if started:
                self._vision_s += time.perf_counter() - started.pop()

        tower.register_forward_pre_hook(before)
        tower.register_forward_hook(after)

    # --- vocabulary ------------------------------------------------------------------------------------
    def _answer_token_ids(self) -> tuple[list[int], list[int]]:
        """Every vocabulary entry that decodes to yes / no in any case or spacing ("Yes", " yes", "▁YES")."""
        yes, no = [], []
        vocab = self.tokenizer.get_vocab()
        special = set(getattr(self.tokenizer, "all_special_ids", []))
        for token, idx in vocab.items():
            if idx in special or len(token) > 8:
                continue
            word = self.tokenizer.convert_tokens_to_string([token]).strip().lower()
            if word in YES_WORDS:
                yes.append(idx)
            elif word in NO_WORDS:
                no.append(idx)
        return sorted(yes), sorted(no)

    # --- prompts -------------------------------------------------------------------------------------
    def _chat(self, text: str) -> str:
        if self.idefics:  # IDEFICS-instruct's format; IMAGE_MARK is where the processor puts the image
            return f"User:{IMAGE_MARK}{text}<end_of_utterance>\nAssistant:"
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return str(self.processor.apply_chat_template(messages, add_generation_prompt=True))

    def split_prompt(self, context: str) -> tuple[str, str]:
        """(prefix with the image and `context`, suffix template that follows each question)."""
        full = self._chat(f"{context}\n{SENTINEL}" if context else SENTINEL)
        prefix, _, suffix = full.partition(SENTINEL)
        return prefix, suffix

    def _encode(self, texts: list[str], images: list[Any], **kwargs: Any) -> Any:
        """Processor outputs for a forward pass (some processors, e.g. PaliGemma's, add training labels)."""
        if self.idefics:
            prompts = []
            for text, im in zip(texts, images, strict=True):
                before, _, after = text.partition(IMAGE_MARK)
                prompts.append([part for part in (before, im, after) if not isinstance(part, str) or part])
            batch = self.processor(text=prompts, return_tensors="pt", **kwargs)
            batch.pop("labels", None)
            return batch
        batch = self.processor(text=texts, images=[[im] for im in images], return_tensors="pt", **kwargs)
        batch.pop("labels", None)
        return batch

    def _inputs(self, texts: list[str], images: list[Any]) -> Any:
        self.tokenizer.padding_side = "left"
        return self._encode(texts, images, padding=True).to(self.device)

    # --- tasks -----------------------------------------------------------------------------------------
    def generate(self, image: Any, prompt: str, *, max_new_tokens: int, min_new_tokens: int = 0) -> str:
        """Greedy generation for a caption or an open question (`prompt` is the user's text)."""
        return self.generate_batch([image], [prompt], max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens)[0]

    def generate_batch(
        self, images: Sequence[Any], prompts: Sequence[str], *, max_new_tokens: int, min_new_tokens: int = 0
    ) -> list[str]:
        """Greedy generation for several images in one call (left-padded), e.g. the captions of a batch."""
        torch = self._torch
        with self._lock, torch.inference_mode():
            if self.captions_only:
                pixel_values = self.processor(images=list(images), return_tensors="pt").pixel_values
                out = self.model.generate(
                    pixel_values.to(self.device, self.dtype),
                    max_new_tokens=max_new_tokens,
                    min_new_tokens=min_new_tokens,
                    do_sample=False,
                )
                return [_printable(str(t)) for t in self.processor.batch_decode(out, skip_special_tokens=True)]
            inputs = self._inputs([self._chat(p) for p in prompts], list(images))
            stops = list(self.options.stop_strings) if not min_new_tokens else []
            out = self.model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                min_new_tokens=min_new_tokens,
                do_sample=False,
                **({"stop_strings": stops, "tokenizer": self.tokenizer} if stops else {}),
            )
            new = out[:, inputs["input_ids"].shape[1] :]
            return [
                _printable(_cut(str(t), self.options.stop_strings))
                for t in self.processor.batch_decode(new, skip_special_tokens=True)
            ]

    def p_yes_shared(
        self, image: Any, context: str, questions: Sequence[str], *, temperature: float = 1.0
    ) -> tuple[list[float], dict[str, float]]:
        """P(yes) for each question with the image + context prefix encoded once."""
        if self.captions_only:
            raise UnsupportedTask(f"model family {self.family} writes captions only; it cannot answer questions")
        if not questions:
            return [], {}
        if self.prefix_lm:
            t0 = time.perf_counter()
            probs = [self.p_yes_full(image, context, q, temperature=temperature) for q in questions]
            return probs, {"scoring_ms": (time.perf_counter() - t0) * 1000}
        if self.packed_scoring:
            return self.p_yes_shared_batch([(image, context, questions)], temperature=temperature)[0]
        # IDEFICS: the image enters by cross-attention, so the questions run as a padded batch that carries
        # the cached perceiver states and an image attention mask
        torch = self._torch
        timings: dict[str, float] = {}
        with self._lock, torch.inference_mode():
            t0 = time.perf_counter()
            prefix, suffix_tpl = self.split_prompt(context)
            pre = self._encode([prefix], [image]).to(self.device)
            t_pre = time.perf_counter()
            self._vision_s = 0.0
            out = self.model(**pre, use_cache=True, logits_to_keep=1)
            cache = _cache_of(out)
            t_end = time.perf_counter()
            # stages: image/prompt preprocessing, vision encoder (+ connector), the prefix's language-model pass
            timings["preprocess_ms"] = (t_pre - t0) * 1000
            timings["vision_ms"] = self._vision_s * 1000
            timings["prefix_ms"] = (t_end - t_pre - self._vision_s) * 1000
            t1 = time.perf_counter()
            k = len(questions)
            self.tokenizer.padding_side = "right"
            suf = self.tokenizer(
                [q + suffix_tpl for q in questions], add_special_tokens=False, padding=True, return_tensors="pt"
            ).to(self.device)
            cache.batch_repeat_interleave(k)
            attn = torch.cat([pre["attention_mask"].repeat(k, 1), suf["attention_mask"]], dim=1)
            n_images = pre["image_attention_mask"].shape[2]
            states_key, states = self._idefics_image_states(out)
            extra: dict[str, Any] = {
                states_key: states.repeat_interleave(k, 0),
                "image_attention_mask": pre["image_attention_mask"].new_ones((k, suf["input_ids"].shape[1], n_images)),
            }
            # only each row's last real token needs the LM head: keep the (few) distinct last positions
            # instead of projecting K × S hidden states onto the whole vocabulary
            last = suf["attention_mask"].sum(1) - 1
            keep = torch.unique(last)
            o2 = self.model(
                input_ids=suf["input_ids"],
                attention_mask=attn,
                use_cache=True,
                logits_to_keep=keep,
                **{self._cache_arg: cache},
                **extra,
            )
            logits = o2.logits[torch.arange(k, device=self.device), torch.searchsorted(keep, last)]
            probs = self._p_yes(logits, temperature)
            timings["scoring_ms"] = (time.perf_counter() - t1) * 1000
        return probs, timings

    def _idefics_image_states(self, out: Any) -> tuple[str, Any]:
        """The image states of an IDEFICS prefix pass, under the forward argument that takes them back.
        transformers 5.2x returns the vision encoder's states as `image_outputs` (its `image_hidden_states`
        became a pooled vector); they go back as `image_encoder_embeddings` and the perceiver resamples
        them again, as transformers' own `generate` does. Older releases return the resampled states."""
        image_outputs = getattr(out, "image_outputs", None)
        if image_outputs is not None:
            return "image_encoder_embeddings", image_outputs.last_hidden_state
        resampled = getattr(self.model.config, "use_resampler", False)
        return ("perceiver_embeddings" if resampled else "image_encoder_embeddings"), out.image_hidden_states

    def p_yes_shared_batch(
        self, items: Sequence[tuple[Any, str, Sequence[str]]], *, temperature: float = 1.0
    ) -> list[tuple[list[float], dict[str, float]]]:
        """P(yes) for the questions of one or more images in two forwards: the N image + context prefixes
        in one left-padded batch, then each image's questions packed in its own row after its prefix.
        Families without packed scoring go one image at a time."""
        if not self.packed_scoring:
            return [self.p_yes_shared(im, ctx, qs, temperature=temperature) for im, ctx, qs in items]
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
            splits = [self.split_prompt(ctx) for _, ctx, _ in items]
            pre = self._inputs([prefix for prefix, _ in splits], [im for im, _, _ in items])
            t_pre = time.perf_counter()
            self._vision_s = 0.0
            mask2d = pre["attention_mask"]
            extra: dict[str, Any] = {}
            if not self.mrope:
                extra["position_ids"] = (mask2d.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens from 0
            out = self.model(**pre, use_cache=True, logits_to_keep=1, **extra)
            t_end = time.perf_counter()
            n = len(items)
            per_ms = {
                "preprocess_ms": (t_pre - t0) * 1000 / n,
                "vision_ms": self._vision_s * 1000 / n,
                "prefix_ms": (t_end - t_pre - self._vision_s) * 1000 / n,
            }
            t1 = time.perf_counter()
            rows = [
                [self.tokenizer(q + suffix_tpl, add_special_tokens=False)["input_ids"] for q in qs]
                for (_, _, qs), (_, suffix_tpl) in zip(items, splits, strict=True)
            ]
            probs = self._score_packed_rows(mask2d, _cache_of(out), rows, temperature)
            scoring_ms = (time.perf_counter() - t1) * 1000
        total_q = max(1, sum(len(r) for r in rows))
        return [(p, {**per_ms, "scoring_ms": scoring_ms * len(r) / total_q}) for p, r in zip(probs, rows, strict=True)]

    def _score_packed_rows(
        self, prefix_mask: Any, cache: Any, rows: list[list[list[int]]], temperature: float
    ) -> list[list[float]]:
        """Each row's questions packed after its (left-padded) cached prefix: no padding between questions
        and no K-fold copy of the cache. A block-diagonal 4D mask lets each question see the prefix and its
        own earlier tokens only, and its positions restart after the prefix, so each answer is exactly what
        a separate continuation would give (checked against a full forward for every family). Rows are
        padded to one length, pad tokens attending only to themselves so every value stays finite."""
        torch = self._torch
        n, p_len = prefix_mask.shape
        lengths = [[len(q) for q in r] for r in rows]
        total = max(sum(ls) for ls in lengths)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((n, total), pad_id, dtype=torch.long, device=self.device)
        positions = torch.zeros((n, total), dtype=torch.long, device=self.device)
        allowed = torch.zeros((n, total, p_len + total), dtype=torch.bool, device=self.device)
        real_prefix = prefix_mask.to(self.device).bool()
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
            for j in range(start, total):  # padding: itself only
                allowed[b, j, p_len + j] = True
            lasts.append(row_last)
        mask = torch.zeros((n, 1, total, p_len + total), dtype=self.dtype, device=self.device)
        mask.masked_fill_(~allowed.view(n, 1, total, p_len + total), torch.finfo(self.dtype).min)
        pos: Any = positions
        if self.mrope:  # text positions after the image carry each row's delta
            deltas = self.model.model.rope_deltas.to(self.device).view(-1, 1)
            pos = (positions + deltas).view(1, n, total).expand(3, n, total)
        keep = torch.unique(torch.tensor([i for row in lasts for i in row], device=self.device))
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            **{self._cache_arg: cache},
            logits_to_keep=keep,  # the LM head only where an answer is read
        )
        return [
            self._p_yes(
                out.logits[b, torch.searchsorted(keep, torch.tensor(lasts[b], device=self.device))], temperature
            )
            for b in range(n)
        ]

    def p_yes_full(self, image: Any, context: str, question: str, *, temperature: float = 1.0) -> float:
        """The same probability from one full forward without a cache (the reference for P2)."""
        torch = self._torch
        prefix, suffix_tpl = self.split_prompt(context)
        with self._lock, torch.inference_mode():
            pre = self._encode([prefix], [image])
            suf = self.tokenizer(question + suffix_tpl, add_special_tokens=False, return_tensors="pt")
            p_len, s_len = pre["input_ids"].shape[1], suf["input_ids"].shape[1]
            batch = {}
            for key, value in pre.items():
                if key in ("input_ids", "attention_mask"):
                    value = torch.cat([value, suf[key]], dim=1)
                elif getattr(value, "dim", lambda: 0)() == 2 and value.shape[1] == p_len:
                    # per-token fields of the prefix (e.g. mm_token_type_ids): suffix tokens are text, 0
                    value = torch.cat([value, value.new_zeros((value.shape[0], s_len))], dim=1)
                elif key == "image_attention_mask":  # IDEFICS: tokens after the image attend to it
                    value = torch.cat([value, value.new_ones((value.shape[0], s_len, value.shape[2]))], dim=1)
                batch[key] = value
            batch = {k: v.to(self.device) for k, v in batch.items()}
            out = self.model(**batch, use_cache=False, logits_to_keep=1)
            return self._p_yes(out.logits[:, -1, :], temperature)[0]

    def _p_yes(self, logits: Any, temperature: float) -> list[float]:
        torch = self._torch
        lp = torch.log_softmax(logits.float(), dim=-1)
        ly = torch.logsumexp(lp[:, self.yes_ids], dim=-1)
        ln = torch.logsumexp(lp[:, self.no_ids], dim=-1)
        return [float(p) for p in torch.sigmoid((ly - ln) / max(temperature, 1e-6)).tolist()]


def _cache_of(out: Any) -> Any:
    """The key/value cache a forward returned (`cache` since transformers 5.2x, `past_key_values` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _merge_adapter(model: Any, adapter: str) -> Any:
    """Apply a PEFT LoRA adapter and merge it into the base weights (no adapter overhead at inference)."""
    try:
        from peft import PeftModel
    except ImportError as exc:
        raise ConfigurationError("a LoRA adapter needs peft: pip install 'nightread[inference]'") from exc
    try:
        return PeftModel.from_pretrained(model, adapter).merge_and_unload()
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"adapter {adapter!r} cannot be applied: {type(exc).__name__}: {exc}") from exc


def remote_code_allowed(model: str, allow_list: list[str]) -> bool:
    """trust_remote_code only for checkpoints named in an explicit allow-list (never by default)."""
    return model in allow_list


def _cut(text: str, stops: Sequence[str]) -> str:
    """The text before the first stop string."""
    for stop in stops:
        if stop:
            text = text.split(stop, 1)[0]
    return text


def _printable(text: str) -> str:
    return "".join(ch for ch in text if ch.isprintable()).strip()


_ENGINES: dict[tuple[str, str | None, EngineOptions], Engine] = {}
_ENGINES_LOCK = threading.Lock()


def load_engine(
    checkpoint: str | Path, *, options: EngineOptions = EngineOptions(), revision: str | None = None
) -> Engine:
    """The engine for a checkpoint, loaded once per process: nightread's transformers engine, or the
    plugin named by `options.engine`."""
    key = (str(checkpoint), revision, options)
    with _ENGINES_LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            t0 = time.perf_counter()
            if options.engine == "transformers":
                engine = VlmEngine(checkpoint, options=options, revision=revision)
            else:
                plugins = engine_plugins()
                if options.engine not in plugins:
                    known = ", ".join(sorted(plugins)) or "none installed"
                    raise ConfigurationError(f"no engine plugin {options.engine!r} ({ENGINE_ENTRY_POINTS}: {known})")
                engine = plugins[options.engine].load()(str(checkpoint), options)
                if not isinstance(engine, Engine):
                    raise ConfigurationError(f"engine plugin {options.engine!r} does not provide the Engine protocol")
            log.info("loaded %s (%s) in %.1f s", engine.family, options.engine, time.perf_counter() - t0)
            _ENGINES[key] = engine
        return engine
