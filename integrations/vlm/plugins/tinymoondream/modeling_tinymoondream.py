"""TinyMoondream: a tiny model laid out like vikhyatk/moondream2's remote code (2024 revisions): a SigLIP-style
ViT (`vision_encoder.encoder`) and an MLP projection (`vision_encoder.projection`) whose image embeddings go
before the text of a Phi decoder (`text_model`), with MoonDream's methods (`encode_image`, `input_embeds`,
`generate`, `answer_question`, `caption`) and a standard causal-LM `forward` (logits over the vocabulary)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import PhiForCausalLM, PreTrainedModel

from .configuration_tinymoondream import TinyMoondreamConfig


class LinearPatchEmbedding(nn.Module):  # type: ignore[misc]
    def __init__(self, patch_size: int, width: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.linear = nn.Linear(3 * patch_size * patch_size, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.patch_size
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return self.linear(x.reshape(b, (h // p) * (w // p), c * p * p))


class Attention(nn.Module):  # type: ignore[misc]
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class MLP(nn.Module):  # type: ignore[misc]
    def __init__(self, width: int, hidden: int, out: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, out or width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ViTBlock(nn.Module):  # type: ignore[misc]
    def __init__(self, width: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = MLP(width, width * mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):  # type: ignore[misc]
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        width, patches = int(cfg["width"]), (int(cfg["image_size"]) // int(cfg["patch_size"])) ** 2
        self.patch_embed = LinearPatchEmbedding(int(cfg["patch_size"]), width)
        self.pos_embed = nn.Parameter(torch.randn(1, patches, width) * 0.02)
        self.blocks = nn.ModuleList(
            ViTBlock(width, int(cfg["heads"]), int(cfg["mlp_ratio"])) for _ in range(int(cfg["layers"]))
        )
        self.norm = nn.LayerNorm(width)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixel_values) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class VisionEncoder(nn.Module):  # type: ignore[misc]
    """MoonDream's VisionEncoder: its own preprocessing (resize, scale to [-1, 1]), the ViT, the projection."""

    def __init__(self, cfg: dict[str, Any], hidden: int) -> None:
        super().__init__()
        self.image_size = int(cfg["image_size"])
        self.encoder = VisionTransformer(cfg)
        self.projection = MLP(int(cfg["width"]), 4 * hidden, hidden)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        side = (self.image_size, self.image_size)
        arrays = [
            np.asarray(im.convert("RGB").resize(side, Image.Resampling.BICUBIC), dtype=np.float32) for im in images
        ]
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0
        return (pixels - 0.5) / 0.5

    def forward(self, images: Any) -> torch.Tensor:
        pixels = images if isinstance(images, torch.Tensor) else self.preprocess(images)
        weight = self.projection.fc1.weight
        return self.projection(self.encoder(pixels.to(weight.device, weight.dtype)))


class TinyMoondreamForCausalLM(PreTrainedModel):  # type: ignore[misc]
    config_class = TinyMoondreamConfig
    base_model_prefix = "tinymoondream"
    _no_split_modules: ClassVar[list[str]] = ["ViTBlock"]

    def __init__(self, config: TinyMoondreamConfig) -> None:
        super().__init__(config)
        text = config.text_config
        self.vision_encoder = VisionEncoder(config.vision_config, text.hidden_size)
        self.text_model = PhiForCausalLM(text)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.text_model.get_input_embeddings()

    # --- MoonDream's interface ---------------------------------------------------------------------------
    def encode_image(self, image: Any) -> torch.Tensor:
        """(B, N, hidden) image embeddings of a PIL image, a list of them, or preprocessed pixels."""
        images = [image] if isinstance(image, Image.Image) else image
        with torch.no_grad():
            return self.vision_encoder(images)

    def input_embeds(self, prompt: str, image_embeds: torch.Tensor, tokenizer: Any) -> torch.Tensor:
        """BOS, then the prompt with the image embeddings where it says <image> (MoonDream's input_embeds)."""
        embed = self.text_model.get_input_embeddings()

        def ids(text: str) -> torch.Tensor:
            return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids.to(self.device)

        parts = [embed(torch.tensor([[tokenizer.bos_token_id]], device=self.device))]
        before, _, after = prompt.partition("<image>")
        if before:
            parts.append(embed(ids(before)))
        parts.append(image_embeds.to(self.device, parts[0].dtype))
        if after:
            parts.append(embed(ids(after)))
        return torch.cat(parts, dim=1)

    def generate(  # MoonDream's signature, not GenerationMixin's
        self, image_embeds: torch.Tensor, prompt: str, tokenizer: Any, max_new_tokens: int = 128, **kwargs: Any
    ) -> list[str]:
        settings = {
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "pad_token_id": tokenizer.bos_token_id,
            "max_new_tokens": max_new_tokens,
            "do_sample": False,
            **kwargs,
        }
        with torch.no_grad():
            out = self.text_model.generate(inputs_embeds=self.input_embeds(prompt, image_embeds, tokenizer), **settings)
        return [str(t) for t in tokenizer.batch_decode(out, skip_special_tokens=True)]

    def answer_question(
        self, image_embeds: torch.Tensor, question: str, tokenizer: Any, chat_history: str = "", **kwargs: Any
    ) -> str:
        prompt = self.config.prompt_template.replace("{text}", f"{chat_history}{question}")
        return self.generate(image_embeds, prompt, tokenizer, **kwargs)[0].strip()

    def caption(self, image_embeds: torch.Tensor, tokenizer: Any, **kwargs: Any) -> str:
        return self.answer_question(image_embeds, "Describe this image.", tokenizer, **kwargs)

    # --- a causal LM's forward -----------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> Any:
        return self.text_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
