"""Expanding each image placeholder into that image's tokens, as one batched tensor program.

The processor writes ONE `<image>` placeholder per image because only the vision tokenizer knows how many
tokens an image becomes. Both `forward` and `generate` call [`expand_image_placeholders`] once the counts
are known, so training and generation see exactly the same sequences.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch.nn import functional as F

IGNORE_INDEX = -100


@dataclass
class ExpandedInputs:
    """Text inputs after expansion: every placeholder became `num_tokens` image positions.

    `input_ids`, `inputs_embeds`, `labels` and `shift_labels` are expanded when they were given (`None`
    otherwise); image positions repeat the placeholder's id or embedding until the image tokens are written in.
    """

    attention_mask: torch.LongTensor
    position_ids: torch.LongTensor
    image_mask: torch.BoolTensor
    input_ids: torch.LongTensor | None = None
    inputs_embeds: torch.Tensor | None = None
    labels: torch.LongTensor | None = None
    shift_labels: torch.LongTensor | None = None


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


def check_placeholder_count(placeholder_mask: torch.BoolTensor, image_token_id: int, num_images: int) -> None:
    """One placeholder per image, or a `ValueError` that names both counts."""
    num_placeholders = int(placeholder_mask.sum())
    if num_placeholders != num_images:
        raise ValueError(
            f"the text holds {num_placeholders} image placeholders (id {image_token_id}) but {num_images} images "
            "were given (pixel_values); the processor writes one placeholder per image"
        )


def expand_image_placeholders(
    placeholder_mask: torch.BoolTensor,
    attention_mask: torch.Tensor | None,
    num_image_tokens: torch.LongTensor,
    input_ids: torch.LongTensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    labels: torch.LongTensor | None = None,
    shift_labels: torch.LongTensor | None = None,
    pad_token_id: int = 0,
    padding_side: Literal["left", "right"] | None = None,
    keep_image_labels: bool = False,
) -> ExpandedInputs:
    """Replace the i-th placeholder (in row-major order of `placeholder_mask`) by `num_image_tokens[i]` positions.

    Padding is dropped and rebuilt on `padding_side` (by default the side the input was padded on, right if
    none); position ids count attended tokens only, so a left-padded row gets the same positions as the same
    row alone. Labels get `-100` on image positions, unless `keep_image_labels`: then a labelled placeholder (an
    image the model is to write) repeats its label on each of its positions. `shift_labels` (each position's
    target, the label of the token after it, as sequence-parallel training passes them) become the targets of
    the expanded sequence, exactly as the expanded `labels` shifted by one would be.
    """
    if placeholder_mask.dim() != 2:
        raise ValueError(f"input_ids must be (batch, sequence), got shape {tuple(placeholder_mask.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones(placeholder_mask.shape, dtype=torch.long, device=placeholder_mask.device)
    if padding_side is None:
        padding_side = "left" if bool((attention_mask[:, 0] == 0).any()) else "right"

    repeats = attention_mask.long().masked_scatter(placeholder_mask, num_image_tokens.to(placeholder_mask.device))
    batch_size = placeholder_mask.shape[0]
    rows = torch.arange(batch_size, device=placeholder_mask.device).repeat_interleave(repeats.sum(dim=1))
    flat_repeats = repeats.flatten()

    def expand(values: torch.Tensor, fill: float | int) -> torch.Tensor:
        flat = values.flatten(0, 1).repeat_interleave(flat_repeats, dim=0)
        return pack_rows(flat, rows, batch_size, fill, padding_side)[0]

    expanded_mask = expand(torch.ones_like(placeholder_mask, dtype=torch.long), 0)
    return ExpandedInputs(
        attention_mask=expanded_mask,
        position_ids=(expanded_mask.cumsum(dim=1) - 1).clamp(min=0),
        image_mask=expand(placeholder_mask, False),
        input_ids=None if input_ids is None else expand(input_ids, pad_token_id),
        inputs_embeds=None if inputs_embeds is None else expand(inputs_embeds, 0.0),
        labels=None
        if labels is None
        else expand(labels if keep_image_labels else labels.masked_fill(placeholder_mask, IGNORE_INDEX), IGNORE_INDEX),
        shift_labels=None
        if shift_labels is None
        else pack_rows(
            expand_shift_labels(shift_labels, placeholder_mask, flat_repeats, keep_image_labels),
            rows,
            batch_size,
            IGNORE_INDEX,
            padding_side,
        )[0],
    )


def expand_shift_labels(
    shift_labels: torch.LongTensor,
    placeholder_mask: torch.BoolTensor,
    flat_repeats: torch.LongTensor,
    keep_image_labels: bool,
) -> torch.LongTensor:
    """The targets of the expanded positions, row-major, from those of the caller's (`shift_labels[:, i]` is the
    label of token `i + 1`).

    A position's own target goes on the last position it expands to; an image's other positions target the
    image's next position, whose label is the placeholder's (`shift_labels` of the position before it). Labels
    on placeholders follow the `labels` rule: `-100` unless `keep_image_labels`.
    """
    placeholder_label = F.pad(shift_labels[:, :-1], (1, 0), value=IGNORE_INDEX)
    if not keep_image_labels:
        targets_a_placeholder = F.pad(placeholder_mask[:, 1:], (0, 1), value=False)
        shift_labels = shift_labels.masked_fill(targets_a_placeholder, IGNORE_INDEX)
        placeholder_label = torch.full_like(placeholder_label, IGNORE_INDEX)
    own = shift_labels.flatten().repeat_interleave(flat_repeats)
    inside = placeholder_label.flatten().repeat_interleave(flat_repeats)
    is_last = torch.zeros_like(own, dtype=torch.bool)
    is_last[flat_repeats.cumsum(0)[flat_repeats > 0] - 1] = True
    return torch.where(is_last, own, inside)


def pack_image_embeds(
    tokens: torch.Tensor, token_mask: torch.BoolTensor, image_rows: torch.LongTensor, batch_size: int
) -> torch.Tensor:
    """Per prompt row, the tokens of its images one after another: `(batch, max tokens per row, width)`.

    Batch-major so `generate` can repeat it per beam like any other input; rows without images are zeros.
    """
    token_rows = image_rows.repeat_interleave(token_mask.sum(dim=1))
    return pack_rows(tokens[token_mask], token_rows, batch_size, 0.0, "right")[0]


def drop_leading_image_embeds(image_embeds: torch.Tensor, count: torch.LongTensor) -> torch.Tensor:
    """Shift each row of `image_embeds` left by `count[row]` tokens (zeros fill the end).

    When generation continues from a cache, the image tokens of the cached prefix are already inside the
    cache; the uncached positions take the row's remaining tokens.
    """
    width = image_embeds.shape[1]
    index = torch.arange(width, device=image_embeds.device)[None, :] + count[:, None]
    shifted = image_embeds.gather(1, index.clamp(max=width - 1)[..., None].expand(-1, -1, image_embeds.shape[-1]))
    return shifted.masked_fill((index >= width)[..., None], 0.0)
