"""Configuration of TinyMoondream, a tiny stand-in laid out like vikhyatk/moondream2's remote code (its 2024
revisions: `configuration_moondream.MoondreamConfig` with a Phi `text_config`)."""

from __future__ import annotations

from typing import Any, ClassVar

from transformers import PhiConfig, PretrainedConfig

# MoonDream2's prompt (moondream.py `answer_question`), after the BOS token
PROMPT_TEMPLATE = "<image>\n\nQuestion: {text}\n\nAnswer:"


class TinyMoondreamConfig(PretrainedConfig):  # type: ignore[misc]
    model_type = "tinymoondream"
    sub_configs: ClassVar[dict[str, type]] = {"text_config": PhiConfig}

    def __init__(
        self,
        text_config: dict[str, Any] | PhiConfig | None = None,
        vision_config: dict[str, Any] | None = None,
        prompt_template: str = PROMPT_TEMPLATE,
        **kwargs: Any,
    ) -> None:
        self.text_config = text_config if isinstance(text_config, PhiConfig) else PhiConfig(**dict(text_config or {}))
        self.vision_config = {
            "image_size": 32,
            "patch_size": 8,
            "width": 32,
            "layers": 2,
            "heads": 2,
            "mlp_ratio": 2,
            **dict(vision_config or {}),
        }
        self.prompt_template = prompt_template
        super().__init__(**kwargs)
