"""Setokim's mask decoder: the vision tokens the LLM writes for a region, read against the image, give its mask.

Every SeTok token is a region of its image, so a referring expression is answered with tokens: the LLM writes
the tokens of the referred region, and this light decoder (MaskFormer-style) turns them into a mask. The queries
(those tokens) cross-attend to the image's patch features and to each other; their pooled embedding is then
dotted with per-pixel embeddings upsampled from the patch grid, so the mask is finer than the grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_mask_decoder import SetokimMaskDecoderConfig
from .modeling_setok import sincos_position_code


class SetokimMaskDecoderLayer(nn.Module):
    """Pre-norm cross-attention (queries -> patch features), self-attention among the queries, then an MLP."""

    def __init__(self, config: SetokimMaskDecoderConfig) -> None:
        super().__init__()
        width, heads = config.hidden_size, config.num_attention_heads
        self.cross_norm, self.self_norm, self.mlp_norm = (nn.LayerNorm(width) for _ in range(3))
        self.cross_attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.self_attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, query_mask: torch.BoolTensor) -> torch.Tensor:
        normed = self.cross_norm(queries)
        queries = queries + self.cross_attention(normed, keys, keys, need_weights=False)[0]
        normed = self.self_norm(queries)
        attended = self.self_attention(normed, normed, normed, key_padding_mask=~query_mask, need_weights=False)[0]
        queries = queries + attended
        return queries + self.mlp(self.mlp_norm(queries))


class SetokimMaskDecoder(PreTrainedModel):
    """Queries `(n, q, query_size)` and patch features `(n, h * w, feature_size)` -> mask logits `(n, H, W)`,
    with `H, W = upscale * (h, w)`.

    A `PreTrainedModel` of its own so it keeps PyTorch's layer initialisation inside any model that owns it:
    Transformers' small normal init would leave its convolutions and dot-product mask too weak to learn from.
    """

    config: SetokimMaskDecoderConfig
    config_class = SetokimMaskDecoderConfig
    base_model_prefix = "mask_decoder"

    def __init__(self, config: SetokimMaskDecoderConfig, query_size: int, feature_size: int) -> None:
        super().__init__(config)
        width = config.hidden_size
        self.query_projection = nn.Linear(query_size, width)
        self.key_projection = nn.Linear(feature_size, width)
        self.layers = nn.ModuleList(SetokimMaskDecoderLayer(config) for _ in range(config.num_layers))
        self.query_norm = nn.LayerNorm(width)
        self.mask_embedding = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
        upsampling: list[nn.Module] = [nn.Conv2d(feature_size, width, kernel_size=3, padding=1)]
        for _ in range(int(math.log2(config.upscale))):
            upsampling += [nn.GELU(), nn.ConvTranspose2d(width, width, kernel_size=2, stride=2)]
        self.pixel_decoder = nn.Sequential(*upsampling, nn.GELU(), nn.Conv2d(width, width, kernel_size=1))
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """PyTorch's defaults, through Transformers' init functions (so loaded weights are left alone)."""
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            fan_in = math.prod(module.weight.shape[1:])
            if isinstance(module, nn.ConvTranspose2d):
                fan_in = module.weight.shape[0] * math.prod(module.weight.shape[2:])
            init.uniform_(module.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.MultiheadAttention):
            init.xavier_uniform_(module.in_proj_weight)
            init.zeros_(module.in_proj_bias)

    def forward(
        self,
        queries: torch.Tensor,
        query_mask: torch.BoolTensor,
        patch_features: torch.Tensor,
        grid_size: tuple[int, int],
    ) -> torch.Tensor:
        if not bool(query_mask.any(dim=1).all()):
            raise ValueError("query_mask: every region needs at least one query token")
        keys = self.key_projection(patch_features)
        keys = keys + sincos_position_code(*grid_size, keys.shape[-1], keys.dtype, keys.device)
        hidden = self.query_projection(queries)
        for layer in self.layers:
            hidden = layer(hidden, keys, query_mask)
        weights = query_mask[..., None].to(hidden.dtype)
        pooled = (self.query_norm(hidden) * weights).sum(dim=1) / weights.sum(dim=1)
        embedding = self.mask_embedding(pooled)
        grid = patch_features.transpose(1, 2).reshape(len(patch_features), -1, *grid_size)
        pixels = self.pixel_decoder(grid)
        return torch.einsum("nc,nchw->nhw", embedding, pixels) / math.sqrt(embedding.shape[-1])


def mask_loss(
    logits: torch.Tensor, targets: torch.Tensor, bce_weight: float, dice_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`bce_weight * BCE + dice_weight * Dice` of mask logits against target masks, and the two parts.

    The logits are resized (bilinear) to the targets' size, so targets may come at any resolution.
    """
    if logits.shape[-2:] != targets.shape[-2:]:
        logits = nn.functional.interpolate(logits[:, None], size=targets.shape[-2:], mode="bilinear")[:, 0]
    logits, targets = logits.float(), targets.float()
    bce = nn.functional.binary_cross_entropy_with_logits(logits, targets)
    probabilities = logits.sigmoid().flatten(1)
    flat_targets = targets.flatten(1)
    overlap = (probabilities * flat_targets).sum(dim=1)
    dice = 1 - (2 * overlap + 1) / (probabilities.sum(dim=1) + flat_targets.sum(dim=1) + 1)
    dice = dice.mean()
    return bce_weight * bce + dice_weight * dice, bce, dice


@dataclass
class SetokimSegmentationOutput(ModelOutput):
    """What `segment` found.

    Attributes:
        mask_logits: `(batch, height, width)` mask logits over the processed image (`upscale` times the patch grid);
            a very negative constant where no region was written. `SetokimProcessor.post_process_masks` takes them
            back to each original image's size.
        region_found: `(batch,)` whether the model wrote a region for the row.
        tokens, token_mask, num_tokens: the region's vision tokens as the LLM wrote them.
        sequences: each prompt, `[Img]`, one placeholder per written token and `[/Img]`, right-padded.
    """

    mask_logits: torch.FloatTensor | None = None
    region_found: torch.BoolTensor | None = None
    tokens: torch.FloatTensor | None = None
    token_mask: torch.BoolTensor | None = None
    num_tokens: torch.LongTensor | None = None
    sequences: torch.LongTensor | None = None


def region_images(
    image_rows: torch.LongTensor, is_target: torch.BoolTensor, batch_size: int, rows: torch.BoolTensor | None = None
) -> torch.LongTensor:
    """Per row, the index of the last image it reads (not one it is to write): the image its region lies in.

    Only the `rows` that segment (all by default) must read an image; the others (a drawing row beside referring
    rows in a training batch) get -1.
    """
    readable = (~is_target).nonzero()[:, 0]
    index = torch.full((batch_size,), -1, dtype=torch.long, device=image_rows.device)
    index.scatter_reduce_(0, image_rows[readable], readable, reduce="amax")
    missing = index < 0 if rows is None else (index < 0) & rows.to(index.device)
    if bool(missing.any()):
        raise ValueError(
            f"rows {missing.nonzero()[:, 0].tolist()} hold no image to segment in; put the image in the prompt"
        )
    return index


__all__ = ["SetokimMaskDecoder", "SetokimSegmentationOutput", "mask_loss", "region_images"]
