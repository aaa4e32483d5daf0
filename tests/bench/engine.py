"""Closed questions by prefix-shared scoring vs one generate() per question, on a SmolVLM-256M-sized model.

The model has SmolVLM-256M-Instruct's real dimensions (config only, random weights: nothing is
downloaded) and is saved and loaded through the engine's own path. One 512×512 image, K questions,
CPU, float32, image splitting off (one 512 px tile, 64 image tokens). Each path is timed several times
and its fastest run counts (the same for both), so a busy moment on a shared machine does not decide.

P1: questions/s with prefix-shared scoring ÷ questions/s with one generate(max_new_tokens=8) each.
P2: max |P(yes) shared − P(yes) from a full forward without cache|.
P2b: one image annotated as LocalAnnotator asks it (a caption + the bundled bank's chest-radiograph
questions: 7 closed, 1 open) with one vision encoding (`annotate_images`) vs the same work task by
task (one generate per caption / open question, one p_yes_shared), the two timed alternately in
the same run: vision-encoder forwards per image (counted by a hook on the encoder) and the time
ratio task by task ÷ encode once (fastest run of each). Both paths decode the same greedy tokens
(the random model writes to its caps); the comparison is repeated with the caption and the answer
capped at one token, which shows the work around decoding alone.
Run: `make bench-engine`. Lines `P1 ratio=<x> P2 maxdiff=<y>` and (last)
`P2b vision_runs_per_image=<n> annotate_speedup=<r>`. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from integrations.ports import AnnotationRequest, ImageContext
from integrations.vlm import prompts
from integrations.vlm.engine import ImageAnnotation, ImageTask, VlmEngine
from integrations.vlm.local import image_task
from integrations.vlm.tiny import SMOLVLM_CHAT_TEMPLATE, smolvlm_text_config, smolvlm_tokenizer

QUESTIONS = [
    "Is there a pleural effusion?",
    "Is there a pneumothorax?",
    "Is the heart enlarged?",
    "Is there a lung consolidation?",
    "Is there pulmonary edema?",
    "Is there a lung nodule or mass?",
    "Are there support devices?",
    "Is there a rib fracture?",
    "Is there atelectasis?",
    "Is there emphysema?",
]


def build_smolvlm_256m(out: Path) -> Path:
    """SmolVLM-256M-Instruct's architecture with random weights, and a tokenizer trained here."""
    import torch
    from transformers import (
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMImageProcessor,
        SmolVLMProcessor,
        SmolVLMVideoProcessor,
    )

    torch.manual_seed(0)
    tok = smolvlm_tokenizer(vocab_size=4096)
    cfg = SmolVLMConfig(
        vision_config={
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "image_size": 512,
            "patch_size": 16,
        },
        text_config={
            **smolvlm_text_config(
                tok,
                hidden_size=576,
                intermediate_size=1536,
                num_hidden_layers=30,
                num_attention_heads=9,
                num_key_value_heads=3,
                max_position_embeddings=8192,
                rope_theta=100000.0,
                tie_word_embeddings=True,
            ),
            "vocab_size": 49280,
        },
        scale_factor=4,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
    )
    size = {"longest_edge": 512}
    proc = SmolVLMProcessor(
        image_processor=SmolVLMImageProcessor(size=size, max_image_size=size, do_image_splitting=False),
        video_processor=SmolVLMVideoProcessor(size=size, max_image_size=size),
        tokenizer=tok,
        image_seq_len=64,
        chat_template=SMOLVLM_CHAT_TEMPLATE,
    )
    model = SmolVLMForConditionalGeneration(cfg).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out


def chest_task(image: Image.Image) -> ImageTask:
    """A caption and the bundled bank's questions for a PA chest radiograph, as LocalAnnotator asks them."""
    from flows.rules.questions import load_bank

    context = ImageContext("DX", "CHEST", "PA")
    questions = load_bank().for_image(modality="DX", body_part="CHEST")
    return image_task(AnnotationRequest(b"", context, questions), image)


def count_vision_runs(engine: VlmEngine, work: Any) -> tuple[int, Any]:
    """(forwards of the vision encoder during `work()`, its result), counted by a hook of our own."""
    runs: list[int] = []
    handle = engine.vision_tower.register_forward_pre_hook(lambda *_: runs.append(1))
    try:
        result = work()
    finally:
        handle.remove()
    return len(runs), result


def count_decoded_tokens(engine: VlmEngine, work: Any) -> tuple[list[int], Any]:
    """(new tokens of each `generate` call during `work()`, its result)."""
    decoded: list[int] = []
    generate = engine.model.generate

    def counted(*args: Any, **kwargs: Any) -> Any:
        out = generate(*args, **kwargs)
        decoded.extend([out.shape[1] - kwargs["input_ids"].shape[1]] * out.shape[0])
        return out

    engine.model.generate = counted
    try:
        result = work()
    finally:
        del engine.model.generate  # back to the class's method
    return decoded, result


def compare_annotate(engine: VlmEngine, task: ImageTask, *, runs: int) -> dict[str, Any]:
    """Task by task vs encode once on the same task, timed alternately (fastest run of each)."""

    def by_task() -> list[ImageAnnotation]:
        return engine.annotate_images([task], encode_once=False)

    def once() -> list[ImageAnnotation]:
        return engine.annotate_images([task])

    times: dict[str, list[float]] = {"task": [], "once": []}
    counts: dict[str, int] = {}
    results: dict[str, ImageAnnotation] = {}
    for _ in range(runs):
        for name, work in (("task", by_task), ("once", once)):
            t0 = time.perf_counter()
            counts[name], (results[name],) = count_vision_runs(engine, work)
            times[name].append(time.perf_counter() - t0)
    a, b = results["task"], results["once"]
    return {
        "times": times,
        "task_s": min(times["task"]),
        "once_s": min(times["once"]),
        "vision_runs": counts,
        "maxdiff": max((abs(x - y) for x, y in zip(a.p_yes, b.p_yes, strict=True)), default=0.0),
        "same_text": a.caption == b.caption and a.answers == b.answers,
        "stages": b.timings_ms,
        "decoded": count_decoded_tokens(engine, once)[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--questions", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--naive-runs", type=int, default=2, help="the baseline is timed this many times (min)")
    parser.add_argument("--shared-runs", type=int, default=3, help="the shared path is timed this many times (min)")
    parser.add_argument("--annotate-runs", type=int, default=5, help="P2b: each path is timed this many times (min)")
    parser.add_argument("--short-runs", type=int, default=2, help="P2b with 1-token caption/answer: runs (0: skip)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    try:
        t0 = time.perf_counter()
        engine = VlmEngine(build_smolvlm_256m(work / "smolvlm-256m-random"))
        params = sum(p.numel() for p in engine.model.parameters())
        print(
            f"model: SmolVLM-256M dimensions, {params / 1e6:.0f} M parameters, random weights, "
            f"built and loaded in {time.perf_counter() - t0:.1f} s; {args.threads} threads, float32",
            flush=True,
        )
        image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8))
        context = prompts.closed_prefix(ImageContext("DX", "CHEST", "PA"))
        questions = [prompts.closed_question(q) for q in (QUESTIONS * 4)[: args.questions]]
        engine.p_yes_shared(image, context, questions[:2])  # warm-up

        naive_runs = []
        for _ in range(args.naive_runs):
            t0 = time.perf_counter()
            for q in questions:
                engine.generate(image, f"{context}\n{q}", max_new_tokens=8, min_new_tokens=8)
            naive_runs.append(time.perf_counter() - t0)
        naive = min(naive_runs)

        fast_runs, stage_runs = [], []
        for _ in range(args.shared_runs):
            t0 = time.perf_counter()
            shared, stages = engine.p_yes_shared(image, context, questions)
            fast_runs.append(time.perf_counter() - t0)
            stage_runs.append(stages)
        fast = min(fast_runs)
        timings = stage_runs[fast_runs.index(fast)]  # the stages of the fastest run

        full = [engine.p_yes_full(image, context, q) for q in questions]
        maxdiff = max(abs(a - b) for a, b in zip(shared, full, strict=True))
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(
            f"K={len(questions)}: one generate(8 tokens) per question {naive:.2f} s "
            f"({len(questions) / naive:.2f} q/s, min of {[round(r, 2) for r in naive_runs]}); prefix-shared "
            f"scoring {fast:.2f} s ({len(questions) / fast:.2f} q/s, min of {[round(r, 2) for r in fast_runs]})"
        )
        print(
            f"stages of the shared path: preprocessing {timings['preprocess_ms']:.0f} ms, vision encoder "
            f"{timings['vision_ms']:.0f} ms, prefix forward {timings['prefix_ms']:.0f} ms, K questions in one "
            f"batched forward {timings['scoring_ms']:.0f} ms; peak RSS {peak_mb:.0f} MB"
        )
        print(f"P1 ratio={naive / fast:.1f} P2 maxdiff={maxdiff:.1e}", flush=True)

        task = chest_task(image)
        print(
            f"P2b work: a caption (cap {task.caption_max_new_tokens} tokens), {len(task.closed_questions)} closed and "
            f"{len(task.open_questions)} open questions (caps {[n for _, n in task.open_questions]}) from the "
            f"bundled bank for a DX CHEST PA image; family {engine.family}: encode once = {engine.encode_once} "
            f"({engine.encode_once_reason})",
            flush=True,
        )
        engine.annotate_images([task])  # warm-up
        cmp = compare_annotate(engine, task, runs=args.annotate_runs)
        stages = ", ".join(f"{k.removesuffix('_ms')} {v:.0f} ms" for k, v in cmp["stages"].items())
        print(
            f"P2b task by task {cmp['task_s']:.2f} s ({cmp['vision_runs']['task']} vision forwards), encode once "
            f"{cmp['once_s']:.2f} s ({cmp['vision_runs']['once']}), min of "
            f"{[round(t, 2) for t in cmp['times']['task']]} / {[round(t, 2) for t in cmp['times']['once']]}; "
            f"same text: {cmp['same_text']}, max |ΔP(yes)| "
            f"{cmp['maxdiff']:.1e}; tokens decoded (caption, answer) {cmp['decoded']}; encode-once stages: {stages}",
            flush=True,
        )
        if args.short_runs:
            short = replace(task, caption_max_new_tokens=1, open_questions=[(q, 1) for q, _ in task.open_questions])
            around = compare_annotate(engine, short, runs=args.short_runs)
            print(
                f"P2b with the caption and the answer capped at 1 token (the work around decoding): task by task "
                f"{around['task_s']:.2f} s, encode once {around['once_s']:.2f} s, ratio "
                f"{around['task_s'] / around['once_s']:.2f}; same text: {around['same_text']}",
                flush=True,
            )
        runs_per_image = cmp["vision_runs"]["once"] / 1  # one image
        print(f"P2b vision_runs_per_image={runs_per_image:.1f} annotate_speedup={cmp['task_s'] / cmp['once_s']:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
