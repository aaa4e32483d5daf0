"""The VLM engine: loads a checkpoint through transformers' Auto classes and answers three kinds of task.

- captions and open questions: greedy generation with a token cap;
- closed questions: scoring, not generation. The image and the shared prompt prefix are encoded
  once; their KV cache is repeated for the K questions, which run in one batched forward; P(yes)
  is the softmax over the logits of every yes/no token variant of the tokenizer at the answer
  position, divided by the model's temperature.
- all three for one image with one vision encoding (`annotate_images`): the image prefix is encoded
  once, the caption and the open answers are decoded from copies of its KV cache and the closed
  questions are scored after it (or, for a prefix-LM, the image's features are computed once).

The engine is what runs in-process (LocalAnnotator) and inside Triton's Python backend.
"""

from __future__ import annotations

import copy
import inspect
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

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


@dataclass(frozen=True)
class ImageTask:
    """Everything asked of one image: an optional caption, closed questions (scored after the shared
    `closed_context`) and open questions as (prompt, max_new_tokens). Prompts are the user's text, as
    for `generate` / `p_yes_shared`; the engine applies its chat template."""

    image: Any
    caption_prompt: str | None = None
    caption_max_new_tokens: int = 48
    closed_context: str = ""
    closed_questions: Sequence[str] = ()
    open_questions: Sequence[tuple[str, int]] = ()


class ImageAnnotation(NamedTuple):
    """The answers for one ImageTask: the caption (None when none was asked), P(yes) per closed question
    and the text per open question, in the task's order, and per-stage timings in ms."""

    caption: str | None
    p_yes: list[float]
    answers: list[str]
    timings_ms: dict[str, float]


@runtime_checkable
class Engine(Protocol):
    """What an engine plugin provides (entry-point group `nightread.engines`).

    A plugin's entry point is a callable `load(checkpoint: str, options: EngineOptions) -> Engine`.
    Raise `UnsupportedTask` from `p_yes_shared` if the architecture cannot answer questions.

    Optional, used by LocalAnnotator when present (see `EncodeOnceEngine`):

    - `generate_batch(images, prompts, *, max_new_tokens, min_new_tokens=0) -> list[str]` and
      `p_yes_shared_batch(items, *, temperature=1.0) -> list[(probabilities, timings)]`;
    - `annotate_images(tasks: Sequence[ImageTask], *, temperature: float = 1.0) -> list[ImageAnnotation]`:
      the caption, closed and open questions of each image with ONE vision encoding per image. It must
      give what `generate` / `p_yes_shared` give task by task. A plain 4-tuple (caption, p_yes, answers,
      timings_ms) is accepted in place of an ImageAnnotation. An engine may also set `encode_once = False`
      (e.g. for a family it cannot do it for): LocalAnnotator then asks task by task.
    """

    family: str
    captions_only: bool
    dtype: Any
    options: EngineOptions

    def generate(self, image: Any, prompt: str, *, max_new_tokens: int, min_new_tokens: int = 0) -> str: ...

    def p_yes_shared(
        self, image: Any, context: str, questions: Sequence[str], *, temperature: float = 1.0
    ) -> tuple[list[float], dict[str, float]]: ...


@runtime_checkable
class EncodeOnceEngine(Protocol):
    """The optional part of the Engine protocol: every task of an image with one vision encoding."""

    def annotate_images(self, tasks: Sequence[ImageTask], *, temperature: float = 1.0) -> list[ImageAnnotation]: ...


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
        self.vision_runs = 0  # forwards of the vision encoder so far (counted by a hook on its module)
        self.vision_tower: Any = None
        self._watch_vision()
        self._encode_once_mode, self.encode_once_reason = self._encode_once_plan()
        # one vision encoding per image for caption + closed + open questions (annotate_images)
        self.encode_once = bool(self._encode_once_mode)
        # an image's caption and open answers in one generate call (rows after the shared prefix) on GPUs
        self.batch_generations = not self.device.startswith("cpu")
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
        if tower is None:
            return
        self.vision_tower = tower
        started: list[float] = []

        def before(*_: Any) -> None:
            self.vision_runs += 1
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
            out = self.model.generate(**inputs, **self._greedy(max_new_tokens, min_new_tokens))
            return self._decode_new(out, inputs["input_ids"].shape[1])

    def _greedy(self, max_new_tokens: int, min_new_tokens: int) -> dict[str, Any]:
        """`generate` arguments of every caption and open answer: greedy, capped, ended at the stop strings
        (unless a minimum length is asked for, as benchmarks do; never more than the cap)."""
        min_new_tokens = min(min_new_tokens, max_new_tokens)
        stops = list(self.options.stop_strings) if not min_new_tokens else []
        return {
            "max_new_tokens": max_new_tokens,
            "min_new_tokens": min_new_tokens,
            "do_sample": False,
            **({"stop_strings": stops, "tokenizer": self.tokenizer} if stops else {}),
        }

    def _decode_new(self, out: Any, prompt_len: int) -> list[str]:
        return [
            _printable(_cut(str(t), self.options.stop_strings))
            for t in self.processor.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
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
            probs = self._score_after_cross_attention(
                cache,
                pre["attention_mask"],
                pre["image_attention_mask"].shape[2],
                self._idefics_image_states(out),
                questions,
                suffix_tpl,
                temperature,
            )
            timings["scoring_ms"] = (time.perf_counter() - t1) * 1000
        return probs, timings

    def _score_after_cross_attention(
        self,
        cache: Any,
        prefix_mask: Any,
        n_images: int,
        image_states: tuple[str, Any],
        questions: Sequence[str],
        suffix_tpl: str,
        temperature: float,
    ) -> list[float]:
        """IDEFICS: the K questions as a right-padded batch after the cached prefix (repeated K times), each
        row carrying the image states and an image attention mask. Consumes `cache`."""
        torch = self._torch
        k = len(questions)
        self.tokenizer.padding_side = "right"
        suf = self.tokenizer(
            [q + suffix_tpl for q in questions], add_special_tokens=False, padding=True, return_tensors="pt"
        ).to(self.device)
        cache.batch_repeat_interleave(k)
        attn = torch.cat([prefix_mask.repeat(k, 1), suf["attention_mask"]], dim=1)
        states_key, states = image_states
        extra: dict[str, Any] = {
            states_key: states.repeat_interleave(k, 0),
            "image_attention_mask": prefix_mask.new_ones((k, suf["input_ids"].shape[1], n_images)),
        }
        # only each row's last real token needs the LM head: keep the (few) distinct last positions
        # instead of projecting K × S hidden states onto the whole vocabulary
        last = suf["attention_mask"].sum(1) - 1
        keep = torch.unique(last)
        out = self.model(
            input_ids=suf["input_ids"],
            attention_mask=attn,
            use_cache=True,
            logits_to_keep=keep,
            **{self._cache_arg: cache},
            **extra,
        )
        logits = out.logits[torch.arange(k, device=self.device), torch.searchsorted(keep, last)]
        return self._p_yes(logits, temperature)

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
        self,
        prefix_mask: Any,
        cache: Any,
        rows: list[list[list[int]]],
        temperature: float,
        leads: list[list[int]] | None = None,
    ) -> list[list[float]]:
        """Each row's questions packed after its (left-padded) cached prefix: no padding between questions
        and no K-fold copy of the cache. A block-diagonal 4D mask lets each question see the prefix and its
        own earlier tokens only, and its positions restart after the prefix, so each answer is exactly what
        a separate continuation would give (checked against a full forward for every family). Rows are
        padded to one length, pad tokens attending only to themselves so every value stays finite.
        `leads` (optional, per row): tokens that continue the cached prefix before the questions, seen by
        every question of the row (the closed-question context after an image prefix shared with other
        tasks). Consumes `cache`."""
        torch = self._torch
        n, p_len = prefix_mask.shape
        leads = leads or [[] for _ in rows]
        total = max(len(lead) + sum(len(q) for q in r) for r, lead in zip(rows, leads, strict=True))
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((n, total), pad_id, dtype=torch.long, device=self.device)
        positions = torch.zeros((n, total), dtype=torch.long, device=self.device)
        allowed = torch.zeros((n, total, p_len + total), dtype=torch.bool, device=self.device)
        real_prefix = prefix_mask.to(self.device).bool()
        prefix_len = real_prefix.sum(1)
        lasts: list[list[int]] = []
        for b, (r, lead) in enumerate(zip(rows, leads, strict=True)):
            flat = [*lead, *(t for q in r for t in q)]
            ids[b, : len(flat)] = torch.tensor(flat, dtype=torch.long, device=self.device)
            n_lead = len(lead)
            if n_lead:  # the lead continues the prefix causally
                positions[b, :n_lead] = int(prefix_len[b]) + torch.arange(n_lead, device=self.device)
                allowed[b, :n_lead, :p_len] = real_prefix[b]
                allowed[b, :n_lead, p_len : p_len + n_lead] = torch.tril(
                    torch.ones((n_lead, n_lead), dtype=torch.bool, device=self.device)
                )
            start, row_last = n_lead, []
            for q in r:
                span = slice(start, start + len(q))
                positions[b, span] = int(prefix_len[b]) + n_lead + torch.arange(len(q), device=self.device)
                allowed[b, span, :p_len] = real_prefix[b]
                allowed[b, span, p_len : p_len + n_lead] = True
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
        prefix, suffix_tpl = self.split_prompt(context)
        with self._lock, self._torch.inference_mode():
            return self._p_yes_full(self._encode([prefix], [image]), question + suffix_tpl, temperature)

    def _p_yes_full(self, pre: Any, suffix: str, temperature: float, **extra: Any) -> float:
        """P(yes) after the processed prefix `pre` followed by the text `suffix`, in one forward (`extra`:
        e.g. pre-encoded image features in place of the prefix's pixel values)."""
        torch = self._torch
        suf = self.tokenizer(suffix, add_special_tokens=False, return_tensors="pt")
        p_len, s_len = pre["input_ids"].shape[1], suf["input_ids"].shape[1]
        batch = {}
        for key, value in pre.items():
            if key in ("input_ids", "attention_mask"):
                value = torch.cat([value, suf[key].to(value.device)], dim=1)
            elif getattr(value, "dim", lambda: 0)() == 2 and value.shape[1] == p_len:
                # per-token fields of the prefix (e.g. mm_token_type_ids): suffix tokens are text, 0
                value = torch.cat([value, value.new_zeros((value.shape[0], s_len))], dim=1)
            elif key == "image_attention_mask":  # IDEFICS: tokens after the image attend to it
                value = torch.cat([value, value.new_ones((value.shape[0], s_len, value.shape[2]))], dim=1)
            batch[key] = value
        batch = {k: v.to(self.device) for k, v in batch.items()}
        out = self.model(**batch, use_cache=False, logits_to_keep=1, **extra)
        return self._p_yes(out.logits[:, -1, :], temperature)[0]

    def _p_yes(self, logits: Any, temperature: float) -> list[float]:
        torch = self._torch
        lp = torch.log_softmax(logits.float(), dim=-1)
        ly = torch.logsumexp(lp[:, self.yes_ids], dim=-1)
        ln = torch.logsumexp(lp[:, self.no_ids], dim=-1)
        return [float(p) for p in torch.sigmoid((ly - ln) / max(temperature, 1e-6)).tolist()]

    # --- one vision encoding per image ------------------------------------------------------------------
    def _encode_once_plan(self) -> tuple[str, str]:
        """How this family answers all of an image's tasks with one vision encoding, or why it cannot."""
        if self.captions_only:
            return "captions", "a captioner: its only task, the caption, encodes the image once"
        if self.prefix_lm:
            if "mm_encoder_outputs" in inspect.signature(self.model.forward).parameters:
                return "features", (
                    "a prefix-LM attends over its whole prompt both ways, so no KV prefix can be shared: the image's "
                    "features are computed once and every task's forward takes them in place of the pixels"
                )
            return "", "a prefix-LM, and this transformers release takes no pre-encoded image features"
        if self.packed_scoring or self.idefics:
            return "prefix", "the image prefix is encoded once; every task continues a copy of its KV cache"
        return "", f"{self.family} is not verified to continue a cached image prefix"

    def annotate_image(
        self,
        image: Any,
        *,
        caption_prompt: str | None = None,
        caption_max_new_tokens: int = 48,
        closed_context: str = "",
        closed_questions: Sequence[str] = (),
        open_questions: Sequence[tuple[str, int]] = (),
        temperature: float = 1.0,
    ) -> ImageAnnotation:
        """Caption, closed and open questions of one image with one vision encoding (see annotate_images)."""
        task = ImageTask(
            image,
            caption_prompt,
            caption_max_new_tokens,
            closed_context,
            tuple(closed_questions),
            tuple(open_questions),
        )
        return self.annotate_images([task], temperature=temperature)[0]

    def annotate_images(
        self,
        tasks: Sequence[ImageTask],
        *,
        temperature: float = 1.0,
        encode_once: bool | None = None,
        min_new_tokens: int = 0,
    ) -> list[ImageAnnotation]:
        """Every task of every image, the vision encoder running once per image where the family allows it
        (`self.encode_once`; how, or why not: `self.encode_once_reason`), else task by task. The results are
        those of `generate` (caption, open answers) and `p_yes_shared` (closed questions). On the CPU images
        go one after another; with `batch_generations` (GPUs) the captions and open answers of all images
        are written in one `generate` call. `encode_once=False` asks task by task (the reference);
        `min_new_tokens` forces every caption and answer to that length (at most its cap), ignoring the stop
        strings (benchmarks)."""
        once = self.encode_once if encode_once is None else encode_once and self.encode_once
        for task in tasks:
            if self.captions_only and (task.closed_questions or task.open_questions):
                raise UnsupportedTask(f"model family {self.family} writes captions only; it cannot answer questions")
        done: list[ImageAnnotation | None] = [None] * len(tasks)
        if once and self._encode_once_mode == "prefix":
            indices = list(range(len(tasks)))
            groups = [indices] if self.batch_generations else [[i] for i in indices]
            for group in groups:
                answered = self._annotate_from_prefix([tasks[i] for i in group], temperature, min_new_tokens)
                for i, annotation in zip(group, answered, strict=True):
                    done[i] = annotation
        elif once and self._encode_once_mode == "features":
            done = [self._annotate_from_features(task, temperature, min_new_tokens) for task in tasks]
        return [
            annotation if annotation is not None else self._annotate_task_by_task(task, temperature, min_new_tokens)
            for annotation, task in zip(done, tasks, strict=True)
        ]

    def _annotate_task_by_task(self, task: ImageTask, temperature: float, min_new_tokens: int) -> ImageAnnotation:
        """One `generate` per caption and open question and one `p_yes_shared`: each encodes the image."""
        timings: dict[str, float] = {}
        caption = None
        if task.caption_prompt is not None:
            t0 = time.perf_counter()
            caption = self.generate(
                task.image,
                task.caption_prompt,
                max_new_tokens=task.caption_max_new_tokens,
                min_new_tokens=min_new_tokens,
            )
            timings["caption_ms"] = (time.perf_counter() - t0) * 1000
        probs: list[float] = []
        if task.closed_questions:
            probs, scored = self.p_yes_shared(
                task.image, task.closed_context, task.closed_questions, temperature=temperature
            )
            timings.update(scored)
        t0 = time.perf_counter()
        answers = [
            self.generate(task.image, p, max_new_tokens=n, min_new_tokens=min_new_tokens)
            for p, n in task.open_questions
        ]
        if answers:
            timings["open_ms"] = (time.perf_counter() - t0) * 1000
        return ImageAnnotation(caption, probs, answers, timings)

    def _task_prompts(self, task: ImageTask) -> tuple[list[tuple[str, int]], list[str], str]:
        """(the generation tasks as (prompt, max_new_tokens), every task's chat text (the generations', then
        the closed questions' shared prefix), the closed questions' suffix template)."""
        gens = [(task.caption_prompt, task.caption_max_new_tokens)] if task.caption_prompt is not None else []
        gens += list(task.open_questions)
        chats = [self._chat(prompt) for prompt, _ in gens]
        suffix_tpl = ""
        if task.closed_questions:
            closed_prefix, suffix_tpl = self.split_prompt(task.closed_context)
            chats.append(closed_prefix)
        return gens, chats, suffix_tpl

    def _annotate_from_prefix(
        self, tasks: Sequence[ImageTask], temperature: float, min_new_tokens: int
    ) -> list[ImageAnnotation | None]:
        """For each image, the tokens all its prompts share (the chat head, the image, often the context
        sentence) run through the model once, vision encoder included (`_encode_prefix`); the captions and
        open answers are `generate`d from that KV cache and the closed questions are packed after it. None
        for an image whose prompts do not share the whole image (the caller then goes task by task)."""
        torch = self._torch
        with self._lock, torch.inference_mode():
            prefixes = [self._encode_prefix(task) for task in tasks]
            live = [p for p in prefixes if p is not None]
            t0 = time.perf_counter()
            written = self._generate_after_prefixes(live, min_new_tokens)
            generate_ms = (time.perf_counter() - t0) * 1000
            results: list[ImageAnnotation | None] = []
            for p in prefixes:
                if p is None:
                    results.append(None)
                    continue
                texts = written[live.index(p)]
                if p.gens:  # the caption and the open answers are written together: the caption's latency is theirs
                    p.timings["generate_ms"] = generate_ms
                    if p.task.caption_prompt is not None:
                        p.timings["caption_ms"] = generate_ms
                probs: list[float] = []
                if p.task.closed_questions:
                    t1 = time.perf_counter()
                    if p.rope_deltas is not None:  # Qwen M-RoPE: text positions after the image carry its delta
                        self.model.model.rope_deltas = p.rope_deltas
                    probs = self._score_after_prefix(
                        p.cache, p.p_len, p.encs[-1], p.task.closed_questions, p.suffix_tpl, temperature, p.image_states
                    )
                    p.timings["scoring_ms"] = (time.perf_counter() - t1) * 1000
                caption = texts.pop(0) if p.task.caption_prompt is not None else None
                results.append(ImageAnnotation(caption, probs, texts, p.timings))
        return results

    def _encode_prefix(self, task: ImageTask) -> _Prefix | None:
        """Process every prompt of `task` with its image (so each task's tokens are exactly those its own call
        would use) and run the tokens they all share through the model, once. None if they do not share the
        whole image."""
        gens, chats, suffix_tpl = self._task_prompts(task)
        if not chats:
            return _Prefix(task, [], [], "", 0, None, None, None, {})
        t0 = time.perf_counter()
        encs = [self._encode([chat], [task.image]).to(self.device) for chat in chats]
        p_len = self._shared_prefix_length([enc["input_ids"][0] for enc in encs], n_generated=len(gens))
        if p_len is None:
            log.debug("%s: the prompts do not share the image prefix; task by task", self.family)
            return None
        t_pre = time.perf_counter()
        self._vision_s = 0.0
        first = encs[0]
        length = first["input_ids"].shape[1]
        out = self.model(
            **{k: v[:, :p_len] if _per_token(k, v, length) else v for k, v in first.items()},
            use_cache=True,
            logits_to_keep=1,
        )
        t_end = time.perf_counter()
        timings = {
            "preprocess_ms": (t_pre - t0) * 1000,
            "vision_ms": self._vision_s * 1000,
            "prefix_ms": (t_end - t_pre - self._vision_s) * 1000,
        }
        image_states = self._idefics_image_states(out) if self.idefics else None
        rope_deltas = self.model.model.rope_deltas if self.mrope else None
        return _Prefix(task, gens, encs, suffix_tpl, p_len, _cache_of(out), image_states, rope_deltas, timings)

    def _generate_after_prefixes(self, prefixes: Sequence[_Prefix], min_new_tokens: int) -> list[list[str]]:
        """The greedy captions / open answers of every prefix's generation prompts (in order), each continuing
        its image's cached prefix: one `generate` call per prompt, or, with `batch_generations`, one call for
        all (see `_generate_together`)."""
        rows = [(p, enc, cap) for p in prefixes for (_, cap), enc in zip(p.gens, p.encs, strict=False)]
        if self._can_generate_together(rows):
            texts = self._generate_together(rows, min_new_tokens)
        else:
            texts = []
            for p, enc, cap in rows:
                if p.rope_deltas is not None:
                    self.model.model.rope_deltas = p.rope_deltas
                out = self.model.generate(
                    **_token_fields(enc),
                    **p.extra,
                    **{self._cache_arg: _fork(p.cache)},
                    **self._greedy(cap, min_new_tokens),
                )
                texts.append(self._decode_new(out, enc["input_ids"].shape[1])[0])
        remaining = iter(texts)
        return [[next(remaining) for _ in p.gens] for p in prefixes]

    def _can_generate_together(self, rows: Sequence[tuple[_Prefix, Any, int]]) -> bool:
        """Rows go in one call on GPUs (`batch_generations`; on the CPU a single row decodes with
        matrix-vector kernels and two rows in one call took longer than two calls), when every cache is a
        plain dynamic one that can be padded, and no sliding attention window could reach the padding."""
        from transformers.cache_utils import DynamicLayer

        if not self.batch_generations or len(rows) < 2:
            return False
        if any(type(layer) is not DynamicLayer for p, _, _ in rows for layer in getattr(p.cache, "layers", [None])):
            return False
        if len({tuple(v.shape) for p, _, _ in rows for v in p.extra.values()}) > 1:
            return False
        total = max(p.p_len for p, _, _ in rows) + max(enc["input_ids"].shape[1] - p.p_len for p, enc, _ in rows)
        window = getattr(self.model.config.get_text_config(), "sliding_window", None)
        return window is None or total + max(cap for _, _, cap in rows) <= window

    def _generate_together(self, rows: Sequence[tuple[_Prefix, Any, int]], min_new_tokens: int) -> list[str]:
        """All rows in one `generate` call: row j is padding, its image's cached prefix, padding, then its
        prompt's own tokens. The caches are left-padded to one length; the padding is masked out and positions
        follow the attention mask, so each row computes what its own call would (cut to its own cap)."""
        torch = self._torch
        p_max = max(p.p_len for p, _, _ in rows)
        total = p_max + max(enc["input_ids"].shape[1] - p.p_len for p, enc, _ in rows)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        columns: dict[str, list[Any]] = {}
        for p, enc, _ in rows:
            for key, value in _token_fields(enc).items():

                def fill(n: int, value: Any = value, key: str = key) -> Any:
                    shape = (value.shape[0], n, *value.shape[2:])
                    return value.new_full(shape, pad_id) if key == "input_ids" else value.new_zeros(shape)

                left, middle = p_max - p.p_len, total - p_max - (value.shape[1] - p.p_len)
                parts = [fill(left), value[:, : p.p_len], fill(middle), value[:, p.p_len :]]
                columns.setdefault(key, []).append(torch.cat(parts, dim=1))
        batch = {key: torch.cat(values, dim=0) for key, values in columns.items()}
        extra = {key: torch.cat([p.extra[key] for p, _, _ in rows], dim=0) for key in rows[0][0].extra}
        if self.mrope:
            self.model.model.rope_deltas = torch.cat([p.rope_deltas for p, _, _ in rows], dim=0)
        out = self.model.generate(
            **batch,
            **extra,
            **{self._cache_arg: _stack_caches([p.cache for p, _, _ in rows], p_max)},
            **self._greedy(max(cap for _, _, cap in rows), min_new_tokens),
        )
        return [self._decode_new(out[j : j + 1, : total + cap], total)[0] for j, (_, _, cap) in enumerate(rows)]

    def _score_after_prefix(
        self,
        cache: Any,
        p_len: int,
        enc: Any,
        questions: Sequence[str],
        suffix_tpl: str,
        temperature: float,
        image_states: tuple[str, Any] | None,
    ) -> list[float]:
        """The closed questions after a cached prefix of `p_len` tokens of their own processed prefix `enc`:
        the rest of it (the context) leads each packed row. Consumes `cache`."""
        ids = enc["input_ids"]
        if self.packed_scoring:
            rows = [[self.tokenizer(q + suffix_tpl, add_special_tokens=False)["input_ids"] for q in questions]]
            lead = [int(t) for t in ids[0, p_len:].tolist()]
            return self._score_packed_rows(enc["attention_mask"][:, :p_len], cache, rows, temperature, leads=[lead])[0]
        assert image_states is not None  # IDEFICS: the context extends the cache, then the questions batch
        if ids.shape[1] > p_len:
            self.model(
                input_ids=ids[:, p_len:],
                attention_mask=enc["attention_mask"],
                image_attention_mask=enc["image_attention_mask"][:, p_len:],
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_arg: cache},
                **dict([image_states]),
            )
        return self._score_after_cross_attention(
            cache,
            enc["attention_mask"],
            enc["image_attention_mask"].shape[2],
            image_states,
            questions,
            suffix_tpl,
            temperature,
        )

    def _shared_prefix_length(self, ids: list[Any], *, n_generated: int) -> int | None:
        """How many leading tokens all prompts share, if that covers the whole image; at least one token of
        each generation prompt is left for `generate` to run."""
        torch = self._torch
        first = ids[0]
        marks = torch.isin(first, torch.tensor(self._image_token_ids, device=first.device)).nonzero()
        if not len(marks):
            return None
        image_end = int(marks.max()) + 1
        shared = len(first)
        for other in ids[1:]:
            n = min(len(first), len(other))
            differ = (first[:n] != other[:n]).nonzero()
            shared = min(shared, int(differ[0]) if len(differ) else n)
        if n_generated:
            shared = min(shared, *(len(x) - 1 for x in ids[:n_generated]))
        return shared if shared >= image_end else None

    @property
    def _image_token_ids(self) -> list[int]:
        """The ids of the tokens that stand for the image in a prompt (placeholders and soft tokens)."""
        found = {getattr(self.model.config, n, None) for n in ("image_token_id", "image_token_index")}
        found.add(getattr(self.processor, "image_token_id", None))
        return sorted(i for i in found if isinstance(i, int))

    def _annotate_from_features(
        self, task: ImageTask, temperature: float, min_new_tokens: int
    ) -> ImageAnnotation | None:
        """A prefix-LM's tasks with the image's features computed once: each task's own forward (or
        `generate`) takes them as `mm_encoder_outputs` instead of the pixels, so it is the task's usual
        computation without the vision encoder. None when the tasks' pixel inputs differ."""
        torch = self._torch
        gens, chats, suffix_tpl = self._task_prompts(task)
        if not chats:
            return ImageAnnotation(None, [], [], {})
        timings: dict[str, float] = {}
        with self._lock, torch.inference_mode():
            t0 = time.perf_counter()
            encs = [self._encode([chat], [task.image]).to(self.device) for chat in chats]
            pixels = [{k: v for k, v in enc.items() if not _per_token(k, v, enc["input_ids"].shape[1])} for enc in encs]
            if any(p.keys() != pixels[0].keys() or not all(torch.equal(p[k], pixels[0][k]) for k in p) for p in pixels):
                return None
            t_pre = time.perf_counter()
            encoder = self.model.get_image_features
            accepted = inspect.signature(encoder).parameters
            features = encoder(**{k: v for k, v in pixels[0].items() if k in accepted}, return_dict=True)
            t_end = time.perf_counter()
            timings["preprocess_ms"] = (t_pre - t0) * 1000
            timings["vision_ms"] = (t_end - t_pre) * 1000
            texts = []
            for (_, max_new_tokens), enc in zip(gens, encs, strict=False):
                t1 = time.perf_counter()
                generated = self.model.generate(
                    **_token_fields(enc),
                    mm_encoder_outputs={"image": features},
                    **self._greedy(max_new_tokens, min_new_tokens),
                )
                texts.append(self._decode_new(generated, enc["input_ids"].shape[1])[0])
                key = "caption_ms" if task.caption_prompt is not None and len(texts) == 1 else "open_ms"
                timings[key] = timings.get(key, 0.0) + (time.perf_counter() - t1) * 1000
            t1 = time.perf_counter()
            probs = [
                self._p_yes_full(
                    _token_fields(encs[-1]), q + suffix_tpl, temperature, mm_encoder_outputs={"image": features}
                )
                for q in task.closed_questions
            ]
            if probs:
                timings["scoring_ms"] = (time.perf_counter() - t1) * 1000
        caption = texts.pop(0) if task.caption_prompt is not None else None
        return ImageAnnotation(caption, probs, texts, timings)


def _fork(cache: Any) -> Any:
    """A KV cache to continue without changing `cache`. A dynamic cache's layers grow by `torch.cat` into new
    tensors, never in place, so a copy of its layer objects that shares their tensors is enough (a deep
    copy cost more than the decoding step it feeds); any other cache is deep-copied."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    layers = getattr(cache, "layers", None)
    if layers is None or any(type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer) for layer in layers):
        return copy.deepcopy(cache)
    fork = copy.copy(cache)
    fork.layers = [copy.copy(layer) for layer in layers]
    return fork


@dataclass(eq=False)  # compared by identity
class _Prefix:
    """An image's tasks with their shared prefix encoded: what the tasks continue."""

    task: ImageTask
    gens: list[tuple[str, int]]  # the caption and open questions: (prompt, max_new_tokens)
    encs: list[Any]  # every task's processed prompt (the generations', then the closed questions' prefix)
    suffix_tpl: str  # what follows each closed question
    p_len: int  # tokens all prompts share, cached
    cache: Any
    image_states: tuple[str, Any] | None  # IDEFICS: the image states the text attends to
    rope_deltas: Any  # Qwen M-RoPE: the prefix's position delta
    timings: dict[str, float]

    @property
    def extra(self) -> dict[str, Any]:
        return dict([self.image_states]) if self.image_states is not None else {}


def _stack_caches(caches: Sequence[Any], length: int) -> Any:
    """One batch of single-row dynamic caches, each left-padded with zeros to `length` (the caller masks the
    padding). The caches themselves are left as they are."""
    import torch.nn.functional as F

    stacked = _fork(caches[0])
    for index, layer in enumerate(stacked.layers):
        for name in ("keys", "values"):
            rows = [getattr(c.layers[index], name) for c in caches]
            setattr(layer, name, _torch().cat([F.pad(r, (0, 0, length - r.shape[-2], 0)) for r in rows], dim=0))
    return stacked


_NOT_PER_TOKEN = frozenset({"pixel_values", "pixel_attention_mask", "image_sizes", "image_grid_thw"})


def _per_token(key: str, value: Any, length: int) -> bool:
    """Whether a processor output runs along the prompt's tokens (input_ids, attention_mask, token types;
    IDEFICS' image_attention_mask) rather than describing the image."""
    if key == "image_attention_mask":
        return True
    return key not in _NOT_PER_TOKEN and getattr(value, "dim", lambda: 0)() == 2 and value.shape[1] == length


def _token_fields(enc: Any) -> dict[str, Any]:
    """A processed prompt without its image inputs: what continues a cached (or pre-encoded) image."""
    length = enc["input_ids"].shape[1]
    return {k: v for k, v in enc.items() if _per_token(k, v, length)}


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
