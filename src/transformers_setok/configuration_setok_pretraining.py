"""Configuration of SeTok stage-1 pretraining: tokenizer, detokenizer and concept head in one model."""

from __future__ import annotations

import math

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .configuration_setok import SetokConfig
from .configuration_setok_detokenizer import SetokDetokenizerConfig


@strict
class SetokForPreTrainingConfig(PreTrainedConfig):
    r"""Configuration of [`SetokForPreTraining`].

    Args:
        setok_config (`dict` or `SetokConfig`, *optional*):
            The vision tokenizer being trained.
        detokenizer_config (`dict` or `SetokDetokenizerConfig`, *optional*):
            The U-Net that redraws images from the tokens; its `token_size` must equal the tokenizer's.
        text_config (`dict` or `PretrainedConfig`, *optional*):
            Any Hugging Face text model embedding the concept phrases; a SigLIP text tower by default.
        freeze_vision_model (`bool`, *optional*, defaults to `True`):
            Keep the tokenizer's vision encoder fixed (the merger always trains).
        freeze_text_model (`bool`, *optional*, defaults to `True`):
            Keep the phrase encoder fixed (its projection to token space always trains).
        reconstruction_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the denoising loss in `loss`.
        contrastive_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the concept-level contrastive loss in `loss`.
        layout_loss_weight (`float`, *optional*, defaults to 0.0):
            Weight of the layout loss in `loss`: the cross-entropy between the detokenizer's token canvas, pooled to
            the patch grid, and the clusters the tokens were merged from, so that each token learns to say which
            patches are its own, and the canvas to read it (needs `detokenizer_config.canvas_channels`).
        logit_scale_init_value (`float`, *optional*, defaults to `log(1 / 0.07)`):
            Initial log inverse temperature of the contrastive loss (CLIP's).
    """

    model_type = "setok_pretraining"
    sub_configs_defaults = {
        "setok_config": SubConfigSpec(config_class=SetokConfig),
        "detokenizer_config": SubConfigSpec(config_class=SetokDetokenizerConfig),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="siglip_text_model"),
    }

    setok_config: dict | PreTrainedConfig | None = None
    detokenizer_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    freeze_vision_model: bool = True
    freeze_text_model: bool = True
    reconstruction_loss_weight: float = 1.0
    contrastive_loss_weight: float = 1.0
    layout_loss_weight: float = 0.0
    logit_scale_init_value: float = math.log(1 / 0.07)

    def validate_token_size(self) -> None:
        """The detokenizer must read tokens of the width the tokenizer writes."""
        if self.detokenizer_config.token_size != self.setok_config.token_size:
            raise ValueError(
                f"detokenizer_config.token_size ({self.detokenizer_config.token_size}) must equal "
                f"setok_config.token_size ({self.setok_config.token_size})"
            )

    def validate_layout_loss(self) -> None:
        """A layout loss needs a canvas to score."""
        if self.layout_loss_weight < 0:
            raise ValueError(f"layout_loss_weight must be >= 0, got {self.layout_loss_weight}")
        if self.layout_loss_weight and not self.detokenizer_config.canvas_channels:
            raise ValueError("layout_loss_weight needs a token canvas: set detokenizer_config.canvas_channels")


__all__ = ["SetokForPreTrainingConfig"]
