"""Configuration of Setokim's mask decoder, which turns the vision tokens written for a region into its mask."""

from __future__ import annotations

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig


@strict
class SetokimMaskDecoderConfig(PreTrainedConfig):
    r"""Configuration of [`SetokimMaskDecoder`].

    Args:
        hidden_size (`int`, *optional*, defaults to 64):
            Width of the decoder's queries, keys and per-pixel embeddings.
        num_layers (`int`, *optional*, defaults to 2):
            Decoder layers (queries cross-attend to the image's patch features, then attend to each other).
        num_attention_heads (`int`, *optional*, defaults to 4):
            Attention heads of every decoder layer.
        upscale (`int`, *optional*, defaults to 4):
            Mask resolution over the patch grid: the mask has `upscale` times the grid's rows and columns.
        query_source (`str`, *optional*, defaults to `"tokens"`):
            `"tokens"`: the queries are the vision tokens the LLM writes for the region (the paper's design);
            `"hidden_states"`: the LLM's hidden states at those positions (LISA's `[SEG]` token, one per token).
        bce_weight (`float`, *optional*, defaults to 2.0):
            Weight of the per-pixel binary cross-entropy in the training loss (LISA's).
        dice_weight (`float`, *optional*, defaults to 0.5):
            Weight of the Dice loss in the training loss (LISA's).
    """

    model_type = "setokim_mask_decoder"

    hidden_size: int = 64
    num_layers: int = 2
    num_attention_heads: int = 4
    upscale: int = 4
    query_source: Literal["tokens", "hidden_states"] = "tokens"
    bce_weight: float = 2.0
    dice_weight: float = 0.5

    def validate_mask_decoder(self) -> None:
        """Reject settings the decoder cannot be built with, naming the argument."""
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.upscale < 1 or self.upscale & (self.upscale - 1):
            raise ValueError(f"upscale must be a power of two (1, 2, 4, ...), got {self.upscale}")
        if self.query_source not in ("tokens", "hidden_states"):
            raise ValueError(f"query_source must be 'tokens' or 'hidden_states', got {self.query_source!r}")
        for name in ("bce_weight", "dice_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


__all__ = ["SetokimMaskDecoderConfig"]
