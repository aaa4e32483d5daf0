"""The seed models' architectures as engine plugins (entry-point group `nightread.engines`).

One composition (`composed.py`: vision tower → connector → causal decoder LM, prefix-shared scoring, one
vision forward per image) and four thin architecture modules with the published checkpoints' module
structure and key names: `tinyllava` (TinyLLaVA / SigPhi-Med), `biomedclip_llama` (BiomedCLIP + LLaMA-3
with LoRA), `med_moe` (Med-MoE, MoE-LLaVA layout) and `medvint` (MedVInT-TD). Each has a `load(checkpoint,
options)` entry point and a tiny offline builder, listed in `PLUGIN_BUILDERS`. The modules import torch;
this package does not until a builder runs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def _tinyllava(out: Path, seed: int = 0) -> Path:
    from integrations.vlm.plugins.tinyllava import build_tiny_tinyllava

    return build_tiny_tinyllava(out, seed=seed)


def _biomedclip_llama(out: Path, seed: int = 0) -> Path:
    from integrations.vlm.plugins.biomedclip_llama import build_tiny_biomedclip_llama

    return build_tiny_biomedclip_llama(out, seed=seed)


def _med_moe(out: Path, seed: int = 0) -> Path:
    from integrations.vlm.plugins.med_moe import build_tiny_med_moe

    return build_tiny_med_moe(out, seed=seed)


def _medvint(out: Path, seed: int = 0) -> Path:
    from integrations.vlm.plugins.medvint import build_tiny_medvint

    return build_tiny_medvint(out, seed=seed)


def _cnn_captioner(out: Path, seed: int = 0) -> Path:
    from integrations.vlm.plugins.cnn_captioner import build_tiny_cnn_captioner

    return build_tiny_cnn_captioner(out, seed=seed)


# plugin (entry-point) name -> build_tiny_<name>(out, seed=0) -> the checkpoint folder
PLUGIN_BUILDERS: dict[str, Callable[..., Path]] = {
    "tinyllava": _tinyllava,
    "biomedclip_llama": _biomedclip_llama,
    "med_moe": _med_moe,
    "medvint": _medvint,
    "cnn_captioner": _cnn_captioner,
}

# what each tiny build stands in for (the published checkpoint; see docs/model.md "Seed models (plugins)")
STANDS_IN_FOR = {
    "tinyllava": "tinyllava/TinyLLaVA-Phi-2-SigLIP-3.1B (SigPhi-Med: same architecture)",
    "biomedclip_llama": "BiomedCLIP ViT-B/16 + Meta-Llama-3-8B-Instruct with LoRA (arXiv 2504.05575)",
    "med_moe": "JsST/TinyMed Stage3 (Med-MoE / MoE-TinyMed, Phi-2 4 experts)",
    "medvint": "MedVInT-TD (PMC-VQA: PMC-CLIP RN50 + PMC-LLaMA/LLaMA-7B, LoRA)",
    "cnn_captioner": "CNN-Transformer captioner of the seed study (DenseNet-121 + transformer decoder)",
}


def build_tiny_plugin(name: str, out: Path, *, seed: int = 0) -> Path:
    """Build the tiny random checkpoint of the plugin `name` under `out`."""
    if name not in PLUGIN_BUILDERS:
        raise ValueError(f"unknown seed plugin {name!r}; choose one of {', '.join(sorted(PLUGIN_BUILDERS))}")
    return PLUGIN_BUILDERS[name](out, seed=seed)
