"""Modality-aware prompt templates. Their sha256 is the prompt version recorded with every result."""

from __future__ import annotations

import hashlib
import json

from integrations.ports import ImageContext

_MODALITY_NAMES = {
    "CR": "chest radiograph",
    "DX": "radiograph",
    "CT": "CT slice",
    "MR": "MRI slice",
    "US": "ultrasound image",
    "MG": "mammogram",
    "XA": "angiography image",
    "PT": "PET image",
    "NM": "nuclear medicine image",
}
_POSITIONS = {
    "HFS": "head first, supine",
    "HFP": "head first, prone",
    "FFS": "feet first, supine",
    "FFP": "feet first, prone",
    "HFDR": "head first, right decubitus",
    "HFDL": "head first, left decubitus",
    "FFDR": "feet first, right decubitus",
    "FFDL": "feet first, left decubitus",
}
_VIEWS = {
    "PA": "posteroanterior (PA)",
    "AP": "anteroposterior (AP)",
    "LL": "left lateral",
    "RL": "right lateral",
    "LAT": "lateral",
}

TEMPLATES = {
    "context": "This is a {what}{of_part}{view}{position}.",
    "caption": "{context} Describe the findings in one or two sentences.",
    # the instruction sits in the prefix shared by all closed questions of an image: the per-question
    # suffix is only the question itself, so scoring K questions runs the fewest tokens
    "closed_prefix": "{context} Answer the question with yes or no.",
    "closed": "{question}",
    "open": "{question} Answer briefly.",
}
PROMPT_VERSION = "p1-" + hashlib.sha256(json.dumps(TEMPLATES, sort_keys=True).encode()).hexdigest()[:8]


def context_text(ctx: ImageContext) -> str:
    what = _MODALITY_NAMES.get(ctx.modality.upper(), "medical image")
    if ctx.modality.upper() in ("CR", "DX") and ctx.body_part.upper() not in ("", "CHEST"):
        what = "radiograph"
    part = ctx.body_part.strip().lower()
    of_part = f" of the {part}" if part and part not in what else ""
    view = f", {_VIEWS.get(ctx.view.upper(), ctx.view.lower())} view" if ctx.view else ""
    position = (
        f", patient {_POSITIONS[ctx.patient_position.upper()]}" if ctx.patient_position.upper() in _POSITIONS else ""
    )
    return TEMPLATES["context"].format(what=what, of_part=of_part, view=view, position=position)


def caption_prompt(ctx: ImageContext) -> str:
    return TEMPLATES["caption"].format(context=context_text(ctx))


def closed_prefix(ctx: ImageContext) -> str:
    return TEMPLATES["closed_prefix"].format(context=context_text(ctx))


def closed_question(text: str) -> str:
    return TEMPLATES["closed"].format(question=text)


def open_question(ctx: ImageContext, text: str) -> str:
    return f"{context_text(ctx)} " + TEMPLATES["open"].format(question=text)
