"""LocalAnnotator: the Annotator port on an in-process engine, and how its checkpoint is found."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from integrations.errors import ConfigurationError
from integrations.ports import AnnotationRequest, AnnotationResult, Answer, ModelInfo
from integrations.vlm import prompts
from integrations.vlm.engine import (
    DEFAULT_STOP_STRINGS,
    EncodeOnceEngine,
    Engine,
    EngineOptions,
    ImageTask,
    load_engine,
)
from integrations.vlm.tiny import build_tiny, tiny_info

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedCheckpoint:
    path: Path
    name: str
    revision: str
    offline_stand_in: bool
    note: str = ""


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
TEXT_SUFFIXES = (".json", ".jinja", ".py", ".txt", ".model")  # config, template, remote code, vocabularies


def _folder_revision(folder: Path) -> str:
    """A content hash of a local checkpoint: its configs, chat template, modeling code (remote code runs, so
    a change to it is a new revision), vocabularies, and each weights file's size and first MiB (cheap,
    stable)."""
    h = hashlib.sha256()
    for name in sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES + TEXT_SUFFIXES):
        path = folder / name
        h.update(name.encode())
        if path.suffix in WEIGHT_SUFFIXES:
            h.update(str(path.stat().st_size).encode())
            with path.open("rb") as fh:
                h.update(fh.read(1 << 20))
        else:
            h.update(path.read_bytes())
    return h.hexdigest()[:12]


def resolve_checkpoint(
    model: str,
    *,
    revision: str | None,
    cache_dir: Path,
    offline_fallback: bool,
    tiny_family: str,
    hub_timeout_s: float = 10.0,
) -> ResolvedCheckpoint:
    """A local folder as it is; a hub id from the local cache or the hub; else (when allowed) a tiny
    random model of `tiny_family`, built once under `cache_dir`, plainly labelled as such."""
    local = Path(model).expanduser()
    if local.is_dir():
        info = tiny_info(local)
        return ResolvedCheckpoint(
            path=local.resolve(),
            name=f"tiny-random-{info['family']}" if info else local.name,
            revision=revision or _folder_revision(local),
            offline_stand_in=info is not None,
        )
    reason = ""
    try:
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(model, revision=revision, local_files_only=True))
        except Exception:
            path = Path(snapshot_download(model, revision=revision, etag_timeout=hub_timeout_s))
        return ResolvedCheckpoint(path=path, name=model, revision=path.name, offline_stand_in=False)
    except Exception as exc:
        reason = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    if not offline_fallback:
        raise ConfigurationError(f"model {model!r} cannot be loaded (not cached, hub unreachable: {reason})")
    from integrations.vlm.plugins import PLUGIN_BUILDERS, build_tiny_plugin

    folder = cache_dir / f"tiny-{tiny_family}"
    if tiny_info(folder) is None:  # a seed plugin's stand-in has that plugin's architecture
        (build_tiny_plugin if tiny_family in PLUGIN_BUILDERS else build_tiny)(tiny_family, folder)
    note = (
        f"model {model!r} could not be loaded (no network and not cached); using a tiny randomly "
        f"initialised {tiny_family} model instead: its answers mean nothing"
    )
    return ResolvedCheckpoint(
        path=folder,
        name=f"tiny-random-{tiny_family}",
        revision=_folder_revision(folder),
        offline_stand_in=True,
        note=note,
    )


def image_task(request: AnnotationRequest, image: Any) -> ImageTask:
    """What the engine is asked about one image: the request's caption and questions in nightread's prompts
    (the same prompts as the task-by-task path)."""
    return ImageTask(
        image=image,
        caption_prompt=prompts.caption_prompt(request.context) if request.caption else None,
        caption_max_new_tokens=request.caption_max_new_tokens,
        closed_context=prompts.closed_prefix(request.context),
        closed_questions=tuple(
            prompts.closed_question(q.prompt or q.text) for q in request.questions if q.kind == "closed"
        ),
        open_questions=tuple(
            (prompts.open_question(request.context, q.prompt or q.text), q.max_new_tokens)
            for q in request.questions
            if q.kind == "open"
        ),
    )


class LocalAnnotator:
    """Runs the engine in this process."""

    backend = "local"

    def __init__(
        self, engine: Engine, *, name: str, revision: str, offline_stand_in: bool = False, temperature: float = 1.0
    ) -> None:
        self.engine = engine
        self.temperature = temperature
        self._info = ModelInfo(
            name=name,
            revision=revision,
            backend=self.backend,
            options={
                "dtype": str(engine.dtype).removeprefix("torch."),
                "family": engine.family,
                "prompt_version": prompts.PROMPT_VERSION,
                **({"adapter": engine.options.adapter} if engine.options.adapter else {}),
                **(
                    {"stop_strings": json.dumps(list(engine.options.stop_strings))}
                    if engine.options.stop_strings != DEFAULT_STOP_STRINGS
                    else {}
                ),
                # P(yes) = sigmoid(logit difference / temperature): a calibration, part of what made a finding
                **({"temperature": repr(float(temperature))} if temperature != 1.0 else {}),
            },
            offline_stand_in=offline_stand_in,
        )

    @classmethod
    def from_checkpoint(
        cls, resolved: ResolvedCheckpoint, *, options: EngineOptions | None = None, temperature: float = 1.0
    ) -> LocalAnnotator:
        engine = load_engine(resolved.path, options=options or EngineOptions())
        return cls(
            engine,
            name=resolved.name,
            revision=resolved.revision,
            offline_stand_in=resolved.offline_stand_in,
            temperature=temperature,
        )

    @property
    def model_info(self) -> ModelInfo:
        return self._info

    @property
    def encodes_once(self) -> bool:
        """Whether each image's caption, closed and open questions share one vision encoding: the engine
        has `annotate_images` and does not say `encode_once = False`."""
        return isinstance(self.engine, EncodeOnceEngine) and getattr(self.engine, "encode_once", True) is not False

    def annotate(self, requests: Sequence[AnnotationRequest]) -> list[AnnotationResult]:
        """Every request's caption and questions: with one vision encoding per image where the engine can
        (`encodes_once`), else captions and closed questions in batched engine calls, open questions per image."""
        from PIL import Image as PILImage

        images = [PILImage.open(io.BytesIO(r.image_png)).convert("RGB") for r in requests]
        if isinstance(self.engine, EncodeOnceEngine) and self.encodes_once:
            return self._annotate_encoded_once(self.engine, requests, images)
        captions = self._captions(requests, images)
        closed = self._closed(requests, images)
        return [
            self._one(r, image, captions.get(i), closed.get(i))
            for i, (r, image) in enumerate(zip(requests, images, strict=True))
        ]

    def _annotate_encoded_once(
        self, engine: EncodeOnceEngine, requests: Sequence[AnnotationRequest], images: list[Any]
    ) -> list[AnnotationResult]:
        tasks = [image_task(r, image) for r, image in zip(requests, images, strict=True)]
        done = engine.annotate_images(tasks, temperature=self.temperature)
        results = []
        for request, (caption, probs, texts, timings) in zip(requests, done, strict=True):
            closed = [q for q in request.questions if q.kind == "closed"]
            opened = [q for q in request.questions if q.kind == "open"]
            answers = {q.id: Answer(q.id, "yes" if p >= 0.5 else "no", p) for q, p in zip(closed, probs, strict=True)}
            answers |= {q.id: Answer(q.id, text, None) for q, text in zip(opened, texts, strict=True)}
            results.append(
                AnnotationResult(
                    caption=caption if request.caption else None,
                    answers=[answers[q.id] for q in request.questions],  # in the bank's order
                    prompt_version=prompts.PROMPT_VERSION,
                    timings_ms=dict(timings),
                )
            )
        return results

    def _closed(
        self, requests: Sequence[AnnotationRequest], images: list[Any]
    ) -> dict[int, tuple[list[float], dict[str, float]]]:
        """The closed questions of every request: in one batched engine call where the engine has one
        (prefixes of all images in one forward, each image's questions packed after its prefix)."""
        todo = [i for i, r in enumerate(requests) if any(q.kind == "closed" for q in r.questions)]
        items = [
            (
                images[i],
                prompts.closed_prefix(requests[i].context),
                [prompts.closed_question(q.prompt or q.text) for q in requests[i].questions if q.kind == "closed"],
            )
            for i in todo
        ]
        batch = getattr(self.engine, "p_yes_shared_batch", None)  # plugins may score one image at a time
        if batch is not None:
            results = batch(items, temperature=self.temperature)
        else:
            results = [self.engine.p_yes_shared(im, ctx, qs, temperature=self.temperature) for im, ctx, qs in items]
        return dict(zip(todo, results, strict=True))

    def _captions(self, requests: Sequence[AnnotationRequest], images: list[Any]) -> dict[int, tuple[str, float]]:
        by_cap: dict[int, list[int]] = {}
        for i, r in enumerate(requests):
            if r.caption:
                by_cap.setdefault(r.caption_max_new_tokens, []).append(i)
        batch = getattr(self.engine, "generate_batch", None)  # plugins may offer one image at a time only
        out: dict[int, tuple[str, float]] = {}
        for max_new_tokens, indices in by_cap.items():
            t0 = time.perf_counter()
            texts_prompts = [prompts.caption_prompt(requests[i].context) for i in indices]
            if batch is not None:
                texts = batch([images[i] for i in indices], texts_prompts, max_new_tokens=max_new_tokens)
            else:
                texts = [
                    self.engine.generate(images[i], p, max_new_tokens=max_new_tokens)
                    for i, p in zip(indices, texts_prompts, strict=True)
                ]
            per_image_ms = (time.perf_counter() - t0) * 1000 / len(indices)
            out.update({i: (text, per_image_ms) for i, text in zip(indices, texts, strict=True)})
        return out

    def _one(
        self,
        request: AnnotationRequest,
        image: Any,
        caption: tuple[str, float] | None,
        scored: tuple[list[float], dict[str, float]] | None,
    ) -> AnnotationResult:
        timings: dict[str, float] = {}
        if caption is not None:
            timings["caption_ms"] = caption[1]
        answers: dict[str, Answer] = {}
        closed = [q for q in request.questions if q.kind == "closed"]
        if closed and scored is not None:
            probs, t = scored
            timings.update(t)
            answers |= {q.id: Answer(q.id, "yes" if p >= 0.5 else "no", p) for q, p in zip(closed, probs, strict=True)}
        t0 = time.perf_counter()
        for q in request.questions:
            if q.kind == "open":
                text = self.engine.generate(
                    image, prompts.open_question(request.context, q.prompt or q.text), max_new_tokens=q.max_new_tokens
                )
                answers[q.id] = Answer(q.id, text, None)
        if any(q.kind == "open" for q in request.questions):
            timings["open_ms"] = (time.perf_counter() - t0) * 1000
        return AnnotationResult(
            caption=caption[0] if caption is not None else None,
            answers=[answers[q.id] for q in request.questions],  # in the bank's order
            prompt_version=prompts.PROMPT_VERSION,
            timings_ms=timings,
        )
