"""Prompt-aware visual token reduction (TRSM, arXiv 2410.07278), batched over images.

The prompt's text token embeddings, in the language model's input space, query the visual tokens of their image:
each visual token scores its best cosine similarity over the query tokens, and only the best-scoring tokens of
each image reach the language model, in their original order. Optionally each dropped token is merged into its
most similar kept token instead of being lost. One padded tensor program, no Python loop over images; ties are
broken by token index (the lower index wins), never by chance.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral, Real

import torch
from torch import nn
from transformers.utils import ModelOutput


@dataclass
class TokenReductionOutput(ModelOutput):
    """The tokens [`prompt_aware_token_reduction`] kept, padded to the largest kept count.

    Attributes:
        image_embeds: `(num_images, max_kept, width)` kept tokens in their original order (each the mean of itself
            and the dropped tokens merged into it with `merge_dropped=True`); zeros in padding slots.
        token_mask: `(num_images, max_kept)` which slots hold a kept token.
        kept_indices: `(num_images, max_kept)` index of each kept token in the input; -1 in padding slots.
        num_tokens_before: `(num_images,)` tokens per image in the input.
        num_tokens_after: `(num_images,)` tokens per image kept.
    """

    image_embeds: torch.FloatTensor | None = None
    token_mask: torch.BoolTensor | None = None
    kept_indices: torch.LongTensor | None = None
    num_tokens_before: torch.LongTensor | None = None
    num_tokens_after: torch.LongTensor | None = None


def check_keep(keep: float | int, name: str = "keep") -> None:
    """Refuse a `keep` that is neither a fraction in (0, 1] nor a count >= 1, naming the argument `name`."""
    if isinstance(keep, bool) or not isinstance(keep, Real):
        raise TypeError(f"{name} must be a float fraction in (0, 1] or an int count >= 1, got {type(keep).__name__}")
    if isinstance(keep, Integral):
        if keep < 1:
            raise ValueError(f"{name} as a token count must be >= 1, got {keep}")
    elif not 0 < keep <= 1:
        raise ValueError(f"{name} as a fraction must be in (0, 1], got {keep}")


def kept_counts(num_tokens: torch.LongTensor, keep: float | int) -> torch.LongTensor:
    """Tokens to keep per image: a fraction rounded up, or a count capped at the image's tokens; at least one.

    The product is rounded to 9 decimals before rounding up, so float noise (`0.7 * 10 = 7.000000000000001`) does
    not keep an extra token.
    """
    check_keep(keep)
    if isinstance(keep, Integral):
        return num_tokens.clamp(max=int(keep))
    counts = torch.ceil(torch.round(num_tokens.double() * float(keep), decimals=9)).long()
    return counts.clamp(min=1)


def check_reduction_inputs(
    image_embeds: torch.Tensor,
    token_mask: torch.Tensor,
    text_embeds: torch.Tensor,
    text_mask: torch.Tensor,
    image_rows: torch.LongTensor | None,
) -> torch.LongTensor:
    """Raise a `ValueError` naming the argument for inconsistent inputs; returns each image's text row."""
    if image_embeds.dim() != 3:
        raise ValueError(
            f"image_embeds must be (num_images, max_tokens, width), got shape {tuple(image_embeds.shape)}"
        )
    if image_embeds.shape[0] == 0:
        raise ValueError("image_embeds holds no image (num_images 0)")
    if token_mask.shape != image_embeds.shape[:2]:
        raise ValueError(
            f"token_mask must be {tuple(image_embeds.shape[:2])} like image_embeds' first two dimensions, "
            f"got {tuple(token_mask.shape)}"
        )
    if text_embeds.dim() != 3 or text_embeds.shape[-1] != image_embeds.shape[-1]:
        raise ValueError(
            f"text_embeds must be (batch, seq_len, {image_embeds.shape[-1]}) (the width of image_embeds), "
            f"got shape {tuple(text_embeds.shape)}"
        )
    if text_mask.shape != text_embeds.shape[:2]:
        raise ValueError(
            f"text_mask must be {tuple(text_embeds.shape[:2])} like text_embeds' first two dimensions, "
            f"got {tuple(text_mask.shape)}"
        )
    num_images, batch_size = image_embeds.shape[0], text_embeds.shape[0]
    if image_rows is None:
        if num_images != batch_size:
            raise ValueError(
                f"image_rows is needed to map {num_images} images onto {batch_size} text rows "
                "(without it, image i is queried by text row i)"
            )
        image_rows = torch.arange(num_images, device=image_embeds.device)
    elif image_rows.shape != (num_images,) or image_rows.is_floating_point():
        raise ValueError(
            f"image_rows must be an integer tensor of shape ({num_images},), one text row per image, "
            f"got {image_rows.dtype} of shape {tuple(image_rows.shape)}"
        )
    elif not 0 <= int(image_rows.min()) <= int(image_rows.max()) < batch_size:
        raise ValueError(f"image_rows must index the {batch_size} rows of text_embeds, got {image_rows.tolist()}")
    empty_images = (~token_mask.any(dim=1)).nonzero().flatten().tolist()
    if empty_images:
        raise ValueError(f"token_mask holds no token for images {empty_images}")
    empty_queries = (~text_mask.any(dim=1)[image_rows]).nonzero().flatten().tolist()
    if empty_queries:
        raise ValueError(f"text_mask selects no query token for images {empty_queries}")
    return image_rows.to(image_embeds.device)


def prompt_aware_token_reduction(
    image_embeds: torch.Tensor,
    token_mask: torch.Tensor,
    text_embeds: torch.Tensor,
    text_mask: torch.Tensor,
    keep: float | int = 0.6,
    merge_dropped: bool = False,
    image_rows: torch.LongTensor | None = None,
) -> TokenReductionOutput:
    """Keep the visual tokens of each image that its prompt is about.

    Args:
        image_embeds: `(num_images, max_tokens, width)` visual tokens in the language model's input space.
        token_mask: `(num_images, max_tokens)` which slots hold a real token.
        text_embeds: `(batch, seq_len, width)` the prompts' token embeddings, same space and width.
        text_mask: `(batch, seq_len)` which text positions query (the caller leaves out special tokens, padding and
            image positions).
        keep: a float is the fraction of each image's tokens kept, in (0, 1], rounded up; an int is a count, capped
            at the image's tokens (so `keep=1.0` keeps all, `keep=1` one). At least one token is always kept.
        merge_dropped: replace each kept token by the mean of itself and the dropped tokens most similar to it
            (by cosine similarity), so dropped regions still reach the language model.
        image_rows: `(num_images,)` row of `text_embeds` each image belongs to, so several images can share one
            prompt; image `i` belongs to row `i` by default.

    Returns:
        [`TokenReductionOutput`]: kept tokens padded, their mask and input indices, and the counts.
    """
    token_mask, text_mask = token_mask.bool(), text_mask.bool()
    image_rows = check_reduction_inputs(image_embeds, token_mask, text_embeds, text_mask, image_rows)
    visual = nn.functional.normalize(image_embeds.float(), dim=-1)
    queries = nn.functional.normalize(text_embeds.float(), dim=-1)[image_rows]
    similarity = (visual @ queries.transpose(1, 2)).masked_fill(~text_mask[image_rows, None, :], -torch.inf)
    return keep_best_scored(image_embeds, token_mask, similarity.amax(dim=-1), keep, merge_dropped)


def keep_best_scored(
    image_embeds: torch.Tensor,
    token_mask: torch.BoolTensor,
    scores: torch.Tensor,
    keep: float | int,
    merge_dropped: bool = False,
) -> TokenReductionOutput:
    """Keep each image's `keep` best-scored tokens (`scores`: `(num_images, max_tokens)`), in their original order;
    equal scores go to the lower index. The selection step of [`prompt_aware_token_reduction`], for any score
    (a baseline's random one, say)."""
    num_tokens = token_mask.sum(dim=1)
    num_kept = kept_counts(num_tokens, keep)
    scores = scores.float().masked_fill(~token_mask, -torch.inf)
    # Stable sorts keep equal scores (and kept tokens) in index order, which breaks ties by the lower index.
    rank = scores.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
    kept = rank < num_kept[:, None]
    max_kept = int(num_kept.max())
    kept_indices = (~kept).to(torch.int8).argsort(dim=1, stable=True)[:, :max_kept]
    kept_mask = torch.arange(max_kept, device=kept.device) < num_kept[:, None]

    tokens = image_embeds
    if merge_dropped:
        tokens = merge_into_kept(image_embeds, token_mask, kept)
    gathered = tokens.gather(1, kept_indices[..., None].expand(-1, -1, tokens.shape[-1]))
    return TokenReductionOutput(
        image_embeds=gathered * kept_mask[..., None].to(gathered.dtype),
        token_mask=kept_mask,
        kept_indices=kept_indices.masked_fill(~kept_mask, -1),
        num_tokens_before=num_tokens,
        num_tokens_after=num_kept,
    )


def merge_into_kept(image_embeds: torch.Tensor, token_mask: torch.BoolTensor, kept: torch.BoolTensor) -> torch.Tensor:
    """`image_embeds` where each kept token is the mean of itself and the dropped tokens nearest to it (cosine;
    ties to the lower index); dropped and padding slots are left as they are, since they are not read."""
    normalized = nn.functional.normalize(image_embeds.float(), dim=-1)
    similarity = (normalized @ normalized.transpose(1, 2)).masked_fill(~kept[:, None, :], -torch.inf)
    positions = torch.arange(kept.shape[1], device=kept.device).expand_as(kept)
    target = torch.where(kept, positions, similarity.argmax(dim=-1))
    membership = nn.functional.one_hot(target, kept.shape[1]).float() * token_mask[..., None]
    sums = membership.transpose(1, 2) @ image_embeds.float()
    merged = sums / membership.sum(dim=1).clamp(min=1)[..., None]
    return torch.where(kept[..., None], merged.to(image_embeds.dtype), image_embeds)
