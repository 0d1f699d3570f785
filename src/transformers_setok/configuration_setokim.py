"""Configuration of Setokim, the multimodal LLM built on SeTok tokens."""

from __future__ import annotations

import re
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .configuration_setok import SetokConfig

PROJECTOR_TYPE_PATTERN = re.compile(r"^(linear|mlp(\d+)x_gelu)$")


@strict
class SetokimConfig(PreTrainedConfig):
    r"""Configuration of [`SetokimModel`] and [`SetokimForConditionalGeneration`].

    Args:
        setok_config (`dict` or `SetokConfig`, *optional*):
            The SeTok vision tokenizer; its `token_size` is the projector's input width.
        text_config (`dict` or `PretrainedConfig`, *optional*):
            Any causal language model's config; Llama by default.
        projector_type (`str`, *optional*, defaults to `"mlp2x_gelu"`):
            `"linear"`, or `"mlp{N}x_gelu"` for N linear layers with GELUs between them.
        image_token_id (`int`, *optional*, defaults to 32000):
            Id of the `<image>` placeholder; the model replaces each one with that image's tokens.
        image_start_token_id (`int`, *optional*, defaults to 32001):
            Id of `[Img]`, which opens an image in the text.
        image_end_token_id (`int`, *optional*, defaults to 32002):
            Id of `[/Img]`, which closes it.
    """

    model_type = "setokim"
    sub_configs_defaults = {
        "setok_config": SubConfigSpec(config_class=SetokConfig),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    setok_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    projector_type: str = "mlp2x_gelu"
    image_token_id: int = 32000
    image_start_token_id: int = 32001
    image_end_token_id: int = 32002
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True

    def validate_projector(self) -> None:
        """Only the projector shapes the paper and LLaVA use are buildable."""
        if not PROJECTOR_TYPE_PATTERN.match(self.projector_type):
            raise ValueError(f"projector_type must be 'linear' or 'mlp{{N}}x_gelu', got {self.projector_type!r}")

    @property
    def projector_depth(self) -> int:
        """Linear layers in the projector."""
        match = PROJECTOR_TYPE_PATTERN.match(self.projector_type)
        return int(match.group(2)) if match.group(2) else 1


__all__ = ["SetokimConfig"]
