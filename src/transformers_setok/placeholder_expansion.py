"""Expanding each image placeholder into that image's tokens, as one batched tensor program.

The processor writes ONE `<image>` placeholder per image because only the vision tokenizer knows how many
tokens an image becomes. Both `forward` and `generate` call [`expand_image_placeholders`] once the counts
are known, so training and generation see exactly the same sequences.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

IGNORE_INDEX = -100


@dataclass
class ExpandedInputs:
    """Text inputs after expansion: every placeholder became `num_tokens` copies of the image token id."""

    input_ids: torch.LongTensor
    attention_mask: torch.LongTensor
    position_ids: torch.LongTensor
    labels: torch.LongTensor | None


def pack_rows(
    values: torch.Tensor, rows: torch.LongTensor, batch_size: int, fill: float | int, padding_side: str
) -> tuple[torch.Tensor, torch.LongTensor]:
    """Lay out `values` (row-major, each tagged with its row) as a padded `(batch_size, max_len, ...)` tensor.

    Returns the packed tensor and the lengths of its rows.
    """
    lengths = torch.bincount(rows, minlength=batch_size)
    width = int(lengths.max()) if len(rows) else 0
    starts = lengths.cumsum(0) - lengths
    position = torch.arange(len(rows), device=rows.device) - starts[rows]
    if padding_side == "left":
        position = position + (width - lengths)[rows]
    packed = values.new_full((batch_size, width, *values.shape[1:]), fill)
    packed[rows, position] = values
    return packed, lengths


def check_placeholder_count(input_ids: torch.LongTensor, image_token_id: int, num_images: int) -> None:
    """One placeholder per image, or a `ValueError` that names both counts."""
    num_placeholders = int((input_ids == image_token_id).sum())
    if num_placeholders != num_images:
        raise ValueError(
            f"input_ids hold {num_placeholders} image placeholders (id {image_token_id}) but {num_images} images "
            "were given (pixel_values); the processor writes one placeholder per image"
        )


def expand_image_placeholders(
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None,
    num_image_tokens: torch.LongTensor,
    image_token_id: int,
    pad_token_id: int,
    labels: torch.LongTensor | None = None,
    padding_side: Literal["left", "right"] | None = None,
) -> ExpandedInputs:
    """Replace the i-th placeholder (in row-major order) by `num_image_tokens[i]` image-token positions.

    Padding is dropped and rebuilt on `padding_side` (by default the side the input was padded on, right if
    none); labels get `-100` on image positions; position ids count attended tokens only, so a left-padded
    row gets the same positions as the same row alone.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, sequence), got shape {tuple(input_ids.shape)}")
    check_placeholder_count(input_ids, image_token_id, len(num_image_tokens))
    is_placeholder = input_ids == image_token_id
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if padding_side is None:
        padding_side = "left" if bool((attention_mask[:, 0] == 0).any()) else "right"

    repeats = attention_mask.long().masked_scatter(is_placeholder, num_image_tokens.to(input_ids.device))
    batch_size = input_ids.shape[0]
    rows = torch.arange(batch_size, device=input_ids.device).repeat_interleave(repeats.sum(dim=1))
    flat_repeats = repeats.flatten()

    def expand(values: torch.Tensor, fill: int) -> torch.Tensor:
        return pack_rows(values.flatten().repeat_interleave(flat_repeats), rows, batch_size, fill, padding_side)[0]

    expanded_ids = expand(input_ids, pad_token_id)
    expanded_mask = expand(torch.ones_like(input_ids), 0)
    expanded_labels = None
    if labels is not None:
        expanded_labels = expand(labels.masked_fill(is_placeholder, IGNORE_INDEX), IGNORE_INDEX)
    position_ids = (expanded_mask.cumsum(dim=1) - 1).clamp(min=0)
    return ExpandedInputs(expanded_ids, expanded_mask, position_ids, expanded_labels)


def pack_image_embeds(
    tokens: torch.Tensor, token_mask: torch.BoolTensor, image_rows: torch.LongTensor, batch_size: int
) -> torch.Tensor:
    """Per prompt row, the tokens of its images one after another: `(batch, max tokens per row, width)`.

    Batch-major so `generate` can repeat it per beam like any other input; rows without images are zeros.
    """
    token_rows = image_rows.repeat_interleave(token_mask.sum(dim=1))
    return pack_rows(tokens[token_mask], token_rows, batch_size, 0.0, "right")[0]
