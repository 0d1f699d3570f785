"""Configuration of Setokim, the multimodal LLM built on SeTok tokens."""

from __future__ import annotations

import re
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .configuration_mask_decoder import SetokimMaskDecoderConfig
from .configuration_setok import SetokConfig
from .configuration_setok_detokenizer import SetokDetokenizerConfig
from .token_reduction import check_keep

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
        vision_output_head (`bool`, *optional*, defaults to `False`):
            Add the vision head that turns hidden states after `[Img]` into SeTok tokens, so the model can draw
            and edit (`generate_images`); off for an understanding-only model.
        detokenizer_config (`dict` or `SetokDetokenizerConfig`, *optional*):
            The detokenizer that renders written tokens to pixels, held in the same checkpoint; `None` leaves it
            out (tokens can still be written, and rendered by a separate `SetokDetokenizerPipeline`).
        image_regression_mse_weight (`float`, *optional*, defaults to 1.0):
            Weight of the mean squared error between predicted and target tokens in the training loss.
        image_regression_cosine_weight (`float`, *optional*, defaults to 1.0):
            Weight of `1 - cosine similarity` between predicted and target tokens in the training loss.
        mask_decoder_config (`dict` or `SetokimMaskDecoderConfig`, *optional*):
            The mask decoder that turns the tokens written for a referred region into its mask (`segment`); needs
            the vision output head. `None` leaves it out.
        visual_token_keep (`float` or `int`, *optional*):
            Prompt-aware token reduction (TRSM): a fraction in (0, 1] of each image's tokens, or a count, that the
            language model reads, chosen by their match with the prompt's text; `None` (the default) keeps them
            all. `forward` and `generate` take it per call too.
        visual_token_merge (`bool`, *optional*, defaults to `False`):
            With `visual_token_keep`, merge each dropped token into the kept token most like it instead of losing it.
    """

    model_type = "setokim"
    sub_configs_defaults = {
        "setok_config": SubConfigSpec(config_class=SetokConfig),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
        "detokenizer_config": SubConfigSpec(config_class=SetokDetokenizerConfig, optional=True),
        "mask_decoder_config": SubConfigSpec(config_class=SetokimMaskDecoderConfig, optional=True),
    }

    setok_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    projector_type: str = "mlp2x_gelu"
    image_token_id: int = 32000
    image_start_token_id: int = 32001
    image_end_token_id: int = 32002
    tie_word_embeddings: bool = False
    vision_output_head: bool = False
    detokenizer_config: dict | PreTrainedConfig | None = None
    image_regression_mse_weight: float = 1.0
    image_regression_cosine_weight: float = 1.0
    mask_decoder_config: dict | PreTrainedConfig | None = None
    visual_token_keep: float | int | None = None
    visual_token_merge: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True

    def validate_visual_token_keep(self) -> None:
        """`visual_token_keep` is a fraction in (0, 1], a count >= 1, or `None`."""
        if self.visual_token_keep is not None:
            check_keep(self.visual_token_keep, "visual_token_keep")

    def validate_projector(self) -> None:
        """Only the projector shapes the paper and LLaVA use are buildable."""
        if not PROJECTOR_TYPE_PATTERN.match(self.projector_type):
            raise ValueError(f"projector_type must be 'linear' or 'mlp{{N}}x_gelu', got {self.projector_type!r}")

    def validate_generation(self) -> None:
        """A detokenizer must read tokens of the tokenizer's width; loss weights cannot be negative."""
        if self.detokenizer_config is not None and self.detokenizer_config.token_size != self.setok_config.token_size:
            raise ValueError(
                f"detokenizer_config.token_size ({self.detokenizer_config.token_size}) must equal "
                f"setok_config.token_size ({self.setok_config.token_size}): it renders the tokens SeTok writes"
            )
        if self.mask_decoder_config is not None and not self.vision_output_head:
            raise ValueError("mask_decoder_config needs vision_output_head=True: it reads the tokens the model writes")
        for name in ("image_regression_mse_weight", "image_regression_cosine_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def vision_config(self) -> PreTrainedConfig:
        """The vision encoder's config, where Transformers looks for it in a multimodal config.

        It is saved once, inside `setok_config` (the tokenizer owns its encoder); this is a view, not a field.
        """
        return self.setok_config.vision_config

    @property
    def projector_depth(self) -> int:
        """Linear layers in the projector."""
        match = PROJECTOR_TYPE_PATTERN.match(self.projector_type)
        return int(match.group(2)) if match.group(2) else 1


__all__ = ["SetokimConfig"]
