"""The captioning baseline of the seed study: a DenseNet-121 encoder and a transformer decoder (CNN-Transformer).
It writes captions only: a question (closed or open) is an `UnsupportedTask`, as for the stock `ved` family.

No public checkpoint of this baseline is known here, so the folder layout is nightread's, made of parts with
published names:

    config.json         model_type "cnn_captioner";
                        encoder {growth_rate 32, block_config [6, 12, 24, 16], num_init_features 64, bn_size 4}
                        (torchvision's densenet121 arguments); image_processor {size 224, mean, std, resize}
                        (ImageNet's mean and std; size a multiple of 32);
                        decoder {d_model, nhead, num_layers, dim_feedforward, max_length, vocab_size,
                        bos_token_id, eos_token_id, pad_token_id}
    model.safetensors
        encoder.features.conv0.weight, encoder.features.norm0.*, encoder.features.denseblockN.denselayerM.
        {norm1, conv1, norm2, conv2}.*, encoder.features.transitionN.{norm, conv}.*, encoder.features.norm5.*
                                — torchvision's `densenet121().features`, under `encoder.` (its `classifier`
                                  is not used and ignored when present)
        encoder_proj.weight, memory_pos                  — the feature map's channels → d_model, and a learned
                                                           position per cell of the (size/32)² grid
        embed_tokens.weight, embed_positions.weight, lm_head.weight
        decoder.layers.N.self_attn.in_proj_weight, decoder.layers.N.multihead_attn.out_proj.weight,
        decoder.layers.N.linear1.weight, decoder.layers.N.norm1.weight, …, decoder.norm.weight
                                — torch.nn.TransformerDecoder (pre-norm, batch_first), its own names
    tokenizer files     a byte-level BPE (tokenizer.json) with its bos/eos/pad tokens

Converting a trained model: `densenet_encoder_state` maps a torchvision / CheXNet DenseNet-121 state dict
(with or without `module.` / `densenet121.` prefixes, old `norm.1`-style names included) onto `encoder.*`;
the decoder's weights keep PyTorch's names under `decoder.`. A caption is decoded greedily from BOS over the
image's spatial features (the prompt is not read: the model is not text-conditioned), with the token cap,
the end-of-text token and the stop strings; a batch of images is encoded and decoded in lockstep.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from integrations.errors import ConfigurationError, UnsupportedTask
from integrations.vlm.engine import EngineOptions, ImageAnnotation, ImageTask, resolve_device, resolve_dtype
from integrations.vlm.plugins import composed
from integrations.vlm.plugins.composed import IMAGENET_MEAN, IMAGENET_STD, ImageSpec

FAMILY = "cnn_captioner"
STANDS_IN_FOR = "CNN-Transformer captioner of the seed study (DenseNet-121 + transformer decoder)"
DENSENET121 = {"growth_rate": 32, "block_config": [6, 12, 24, 16], "num_init_features": 64, "bn_size": 4}
DOWNSAMPLING = 32  # densenet121's features: stride-2 conv0, stride-2 pool0, three stride-2 transitions
PUBLISHED_KEYS = (
    "encoder.features.conv0.weight",
    "encoder.features.norm0.running_mean",
    "encoder.features.denseblock1.denselayer1.norm1.weight",
    "encoder.features.denseblock1.denselayer1.conv1.weight",
    "encoder.features.denseblock2.denselayer2.conv2.weight",
    "encoder.features.transition1.norm.weight",
    "encoder.features.transition1.conv.weight",
    "encoder.features.denseblock4.denselayer1.conv2.weight",
    "encoder.features.norm5.weight",
    "encoder_proj.weight",
    "memory_pos",
    "embed_tokens.weight",
    "embed_positions.weight",
    "decoder.layers.0.self_attn.in_proj_weight",
    "decoder.layers.0.multihead_attn.out_proj.weight",
    "decoder.layers.0.linear1.weight",
    "decoder.layers.0.norm3.weight",
    "decoder.norm.weight",
    "lm_head.weight",
)
_QUESTIONS_REFUSED = f"model family {FAMILY} writes captions only; it cannot answer questions"


class DenseNetEncoder(nn.Module):  # type: ignore[misc]
    """torchvision's DenseNet `features` (the module names of densenet121), without its classifier."""

    def __init__(self, encoder: dict[str, Any]) -> None:
        super().__init__()
        from torchvision.models import DenseNet

        dense = DenseNet(
            growth_rate=int(encoder.get("growth_rate", DENSENET121["growth_rate"])),
            block_config=tuple(int(n) for n in encoder.get("block_config", DENSENET121["block_config"])),
            num_init_features=int(encoder.get("num_init_features", DENSENET121["num_init_features"])),
            bn_size=int(encoder.get("bn_size", DENSENET121["bn_size"])),
        )
        self.features = dense.features
        self.channels = int(dense.classifier.in_features)

    def forward(self, pixel_values: Any) -> Any:
        """(B, C, h, w) after the final norm and ReLU, as torchvision's DenseNet.forward has them."""
        return torch.relu(self.features(pixel_values))


class CnnCaptioner(nn.Module):  # type: ignore[misc]
    """The published module tree: `encoder`, `encoder_proj`, `memory_pos`, `embed_tokens`, `embed_positions`,
    `decoder`, `lm_head`."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        encoder = composed.require(config, "encoder", dict)
        decoder = composed.require(config, "decoder", dict)
        size = int(composed.require(composed.require(config, "image_processor", dict), "size", int))
        if size % DOWNSAMPLING:
            raise ConfigurationError(f"config.json: image_processor field 'size' must be a multiple of {DOWNSAMPLING}")
        d_model = int(composed.require(decoder, "d_model", int, where="decoder"))
        vocab = int(composed.require(decoder, "vocab_size", int, where="decoder"))
        self.max_length = int(decoder.get("max_length", 128))
        self.encoder = DenseNetEncoder(encoder)
        self.encoder_proj = nn.Linear(self.encoder.channels, d_model)
        self.memory_pos = nn.Parameter(torch.zeros(1, (size // DOWNSAMPLING) ** 2, d_model))
        self.embed_tokens = nn.Embedding(vocab, d_model)
        self.embed_positions = nn.Embedding(self.max_length, d_model)
        layer = nn.TransformerDecoderLayer(
            d_model,
            int(composed.require(decoder, "nhead", int, where="decoder")),
            int(decoder.get("dim_feedforward", 4 * d_model)),
            dropout=float(decoder.get("dropout", 0.1)),
            batch_first=True,
            norm_first=True,
        )
        self.decoder = nn.TransformerDecoder(
            layer, int(composed.require(decoder, "num_layers", int, where="decoder")), norm=nn.LayerNorm(d_model)
        )
        self.lm_head = nn.Linear(d_model, vocab, bias=False)

    def memory(self, pixel_values: Any) -> Any:
        """(B, cells, d_model): the encoder's spatial features, projected, with their positions."""
        grid = self.encoder(pixel_values).flatten(2).transpose(1, 2)
        return self.encoder_proj(grid) + self.memory_pos

    def logits(self, tokens: Any, memory: Any) -> Any:
        """(B, L, vocab) for the token prefix `tokens` (B, L), causally."""
        length = tokens.shape[1]
        positions = torch.arange(length, device=tokens.device)
        x = self.embed_tokens(tokens) + self.embed_positions(positions)[None]
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device, dtype=x.dtype)
        return self.lm_head(self.decoder(x, memory, tgt_mask=mask, tgt_is_causal=True))


def densenet_encoder_state(state: dict[str, Any]) -> dict[str, Any]:
    """A torchvision densenet121 (or CheXNet) state dict → this layout's `encoder.features.*` keys: `module.` and
    `densenet121.` prefixes dropped, old names (`denselayer1.norm.1.weight`) renamed as torchvision's own loader
    does, the classifier left out."""
    old = re.compile(
        r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
    )
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.").removeprefix("densenet121.")
        match = old.match(key)
        if match:
            key = match.group(1) + match.group(2)
        if key.startswith("features."):
            out[f"encoder.{key}"] = value
    return out


class CnnCaptionerEngine:
    """An `Engine` for the CNN-Transformer captioner: captions only. Thread-safe: calls are serialised."""

    captions_only = True
    encode_once = True  # a caption is the only task: one encoder forward per image

    def __init__(
        self,
        *,
        checkpoint: str,
        model: CnnCaptioner,
        tokenizer: Any,
        image: ImageSpec,
        config: dict[str, Any],
        options: EngineOptions,
    ) -> None:
        self.checkpoint = checkpoint
        self.family = FAMILY
        self.options = options
        self.device = resolve_device(options.device)
        self.dtype = resolve_dtype(options.dtype, self.device)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.vision_tower = self.model.encoder
        self.tokenizer = tokenizer
        self.image_spec = image
        decoder = config["decoder"]
        self.bos_id = int(decoder.get("bos_token_id", tokenizer.bos_token_id))
        self.eos_id = int(decoder.get("eos_token_id", tokenizer.eos_token_id))
        self._lock = threading.Lock()

    @classmethod
    def from_folder(cls, checkpoint: str, options: EngineOptions) -> CnnCaptionerEngine:
        folder = Path(checkpoint).expanduser()
        if not folder.is_dir():
            raise ConfigurationError(
                f"engine {FAMILY!r} loads a local checkpoint folder; {checkpoint!r} is not one (see docs/model.md)"
            )
        config = composed.read_config(folder)
        if config.get("model_type") != FAMILY:
            raise ConfigurationError(f"{folder}/config.json is not a CNN captioner checkpoint (model_type {FAMILY!r})")
        image = composed.image_spec(composed.require(config, "image_processor", dict), where="config.json")
        with composed.skip_init():
            model = CnnCaptioner(config)
        state = composed.read_state_dict(folder)
        missing = composed.load_weights(model, state, ignore_prefixes=("encoder.classifier.",))
        composed.require_complete(missing)
        if options.adapter:  # a PEFT LoRA fine-tune of the decoder's linear layers, merged
            composed.apply_lora(model, options.adapter, merge=True)
        tokenizer = composed.load_tokenizer(folder)
        return cls(
            checkpoint=str(folder), model=model, tokenizer=tokenizer, image=image, config=config, options=options
        )

    # --- tasks ---------------------------------------------------------------------------------------------
    def generate(self, image: Any, prompt: str, *, max_new_tokens: int, min_new_tokens: int = 0) -> str:
        """The caption of one image (`prompt` is not read: the model is not text-conditioned)."""
        return self.generate_batch([image], [prompt], max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens)[0]

    def generate_batch(
        self, images: Sequence[Any], prompts: Sequence[str], *, max_new_tokens: int, min_new_tokens: int = 0
    ) -> list[str]:
        """Greedy captions of several images, encoded in one forward and decoded in lockstep."""
        return self._captions(images, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens)[0]

    def _captions(
        self, images: Sequence[Any], *, max_new_tokens: int, min_new_tokens: int = 0
    ) -> tuple[list[str], dict[str, float]]:
        if not images:
            return [], {}
        max_new_tokens = min(max_new_tokens, self.model.max_length - 1)
        min_new_tokens = min(min_new_tokens, max_new_tokens)
        stops = [s for s in self.options.stop_strings if s] if not min_new_tokens else []
        with self._lock, torch.inference_mode():
            t0 = time.perf_counter()
            pixels = composed.preprocess(images, self.image_spec).to(self.device, self.dtype)
            t_vision = time.perf_counter()
            memory = self.model.memory(pixels)
            t_decode = time.perf_counter()
            n = len(images)
            tokens = torch.full((n, 1), self.bos_id, dtype=torch.long, device=self.device)
            done = torch.zeros(n, dtype=torch.bool, device=self.device)
            for step in range(max_new_tokens):
                logits = self.model.logits(tokens, memory)[:, -1].float()
                if step < min_new_tokens:
                    logits[:, self.eos_id] = float("-inf")
                nxt = logits.argmax(-1)
                nxt = torch.where(done, torch.full_like(nxt, self.eos_id), nxt)
                tokens = torch.cat([tokens, nxt[:, None]], dim=1)
                done |= nxt == self.eos_id
                if stops:
                    for i in range(n):
                        if not done[i] and any(s in self._decode(tokens[i]) for s in stops):
                            done[i] = True
                if bool(done.all()):
                    break
            texts = [composed._printable(composed._cut(self._decode(row), self.options.stop_strings)) for row in tokens]
            t_end = time.perf_counter()
        per_image = {
            "preprocess_ms": (t_vision - t0) * 1000 / n,
            "vision_ms": (t_decode - t_vision) * 1000 / n,
            "caption_ms": (t_end - t_decode) * 1000 / n,
        }
        return texts, per_image

    def _decode(self, row: Any) -> str:
        """The text of one row's generated tokens, up to its first end-of-text."""
        ids = [int(t) for t in row[1:].tolist()]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def p_yes_shared(
        self, image: Any, context: str, questions: Sequence[str], *, temperature: float = 1.0
    ) -> tuple[list[float], dict[str, float]]:
        raise UnsupportedTask(_QUESTIONS_REFUSED)

    def annotate_images(self, tasks: Sequence[ImageTask], *, temperature: float = 1.0) -> list[ImageAnnotation]:
        """The captions of the tasks (one batch per token cap); any question is an UnsupportedTask."""
        if any(t.closed_questions or t.open_questions for t in tasks):
            raise UnsupportedTask(_QUESTIONS_REFUSED)
        results = [ImageAnnotation(None, [], [], {}) for _ in tasks]
        by_cap: dict[int, list[int]] = {}
        for i, task in enumerate(tasks):
            if task.caption_prompt is not None:
                by_cap.setdefault(task.caption_max_new_tokens, []).append(i)
        for cap, indices in by_cap.items():
            texts, timings = self._captions([tasks[i].image for i in indices], max_new_tokens=cap)
            for i, text in zip(indices, texts, strict=True):
                results[i] = ImageAnnotation(text, [], [], dict(timings))
        return results


def load(checkpoint: str, options: EngineOptions) -> CnnCaptionerEngine:
    """The `nightread.engines` entry point `cnn_captioner`."""
    return CnnCaptionerEngine.from_folder(checkpoint, options)


def build_tiny_cnn_captioner(out: Path, seed: int = 0) -> Path:
    """A tiny random CNN captioner (DenseNet growth 8, blocks [1, 2, 2, 1]; decoder 2 layers of width 32; 64 x 64
    input) in the layout above."""
    from integrations.vlm.tiny import train_tokenizer

    torch.manual_seed(seed)
    tok = train_tokenizer(["<pad>", "<bos>", "<eos>"], bos="<bos>", eos="<eos>", pad="<pad>")
    config = {
        "architectures": ["CnnCaptioner"],
        "model_type": FAMILY,
        "encoder": {"growth_rate": 8, "block_config": [1, 2, 2, 1], "num_init_features": 16, "bn_size": 2},
        "image_processor": {"size": 64, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "resize": "squash"},
        "decoder": {
            "d_model": 32,
            "nhead": 2,
            "num_layers": 2,
            "dim_feedforward": 64,
            "max_length": 128,
            "vocab_size": len(tok),
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        },
    }
    model = CnnCaptioner(config).eval()
    with torch.no_grad():  # BatchNorm starts as the identity: give it running statistics, as a trained model has
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_(0.0, 0.1)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
        model.memory_pos.normal_(0.0, 0.02)
    out.mkdir(parents=True, exist_ok=True)
    composed.write_config(out, config)
    composed.save_weights(composed.published_state(model), out)
    tok.save_pretrained(str(out))
    composed.write_tiny_marker(out, family=FAMILY, stands_in_for=STANDS_IN_FOR, seed=seed)
    return out
