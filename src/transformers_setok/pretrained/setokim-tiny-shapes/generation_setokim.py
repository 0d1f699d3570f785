"""Setokim draws: continuous SeTok tokens out of the LLM, as many as the picture needs.

After `[Img]`, every hidden state goes through the vision head to a predicted SeTok token, which goes back into
the LLM through the input projector exactly as an understood image token does. The LM head decides after every
vision token whether another follows (the `<image>` placeholder id) or the image ends (`[/Img]`), so the count
is the model's own choice, as SeTok's counts follow each image's content. Training teaches both: the
placeholder id and `[/Img]` are ordinary cross-entropy targets, and the predicted tokens regress to the target
image's tokens from the (frozen) tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers.utils import ModelOutput

from .configuration_setokim import SetokimConfig

if TYPE_CHECKING:
    from .modeling_setokim import SetokimForConditionalGeneration


class SetokimVisionHead(nn.Sequential):
    """LLM hidden state -> a predicted SeTok token: the input projector's shape, mirrored."""

    def __init__(self, config: SetokimConfig) -> None:
        token_size, text_size = config.setok_config.token_size, config.text_config.hidden_size
        layers: list[nn.Module] = []
        for _ in range(config.projector_depth - 1):
            layers += [nn.Linear(text_size, text_size), nn.GELU()]
        super().__init__(*layers, nn.Linear(text_size, token_size))


@dataclass
class SetokimImageGenerationOutput(ModelOutput):
    """What `generate_images` drew, and the tokens the LLM wrote for it.

    Attributes:
        images: one image per prompt (a list of PIL images, or an array or tensor, as `output_type` says);
            `None` when rendering was turned off.
        tokens: `(batch, max_tokens, token_size)` the predicted SeTok tokens; zeros in padding slots.
        token_mask: `(batch, max_tokens)` which slots hold a written token.
        num_tokens: `(batch,)` vision tokens the LLM wrote per image.
        sequences: `(batch, length)` the caller's `input_ids`, any text written before the image, then
            `[Img]`, one placeholder per vision token and `[/Img]`; right-padded with the pad token.
    """

    images: Any = None
    tokens: torch.FloatTensor | None = None
    token_mask: torch.BoolTensor | None = None
    num_tokens: torch.LongTensor | None = None
    sequences: torch.LongTensor | None = None


@dataclass
class WrittenVisionTokens(ModelOutput):
    """What the vision-token loop wrote.

    Attributes:
        tokens: `(batch, max_tokens, token_size)` the predicted tokens; zeros in padding slots.
        token_mask: `(batch, max_tokens)` which slots hold a written token.
        num_tokens: `(batch,)` tokens written per row.
        hidden_states: `(batch, max_tokens, text_hidden_size)` the LLM state each token was predicted from.
        image_features: the prompt images' features (their patch features are what a mask decoder reads), or
            `None` for prompts without images.
    """

    tokens: torch.FloatTensor | None = None
    token_mask: torch.BoolTensor | None = None
    num_tokens: torch.LongTensor | None = None
    hidden_states: torch.FloatTensor | None = None
    image_features: Any = None


def image_regression_loss(
    predicted: torch.Tensor, target: torch.Tensor, mse_weight: float, cosine_weight: float
) -> torch.Tensor:
    """`mse_weight * MSE + cosine_weight * (1 - cosine)` between predicted and target tokens `(n, token_size)`."""
    predicted, target = predicted.float(), target.float()
    mse = nn.functional.mse_loss(predicted, target)
    cosine = nn.functional.cosine_similarity(predicted, target, dim=-1).mean()
    return mse_weight * mse + cosine_weight * (1.0 - cosine)


def check_generation_setup(model: SetokimForConditionalGeneration, max_image_tokens: int, render: bool) -> None:
    """The parts `generate_images` needs, or an error naming the config switch."""
    if model.vision_head is None:
        raise ValueError(
            "this Setokim has no vision output head, so it cannot write images; build it with "
            "config.vision_output_head=True (and train it for generation)"
        )
    if render and model.detokenizer is None:
        raise ValueError(
            "this Setokim has no detokenizer to render the tokens it writes; give the config a detokenizer_config, "
            "or pass render=False to get the tokens only"
        )
    if not isinstance(max_image_tokens, int) or max_image_tokens < 1:
        raise ValueError(f"max_image_tokens must be a positive int, got {max_image_tokens!r}")


def text_stops(image_start_token_id: int, eos_token_id: int | list[int] | None) -> list[int]:
    """The ids that end the text before an image: `[Img]` first (the image starts), then EOS."""
    eos = eos_token_id if isinstance(eos_token_id, list) else [] if eos_token_id is None else [eos_token_id]
    return [image_start_token_id, *eos]


def prompts_opening_an_image(
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor,
    new_tokens: torch.LongTensor | None,
    stops: list[int],
) -> tuple[list[list[int]], list[bool]]:
    """Each row's prompt, the text written before its image (up to the first of `stops`), then `[Img]` (`stops[0]`);
    and per row whether the model opened the image itself (`False` where its text ended with EOS first)."""
    start = stops[0]
    rows, opened = [], []
    for row, (ids, mask) in enumerate(zip(input_ids.tolist(), attention_mask.tolist())):
        prompt = [token for token, keep in zip(ids, mask) if keep]
        text = new_tokens[row].tolist() if new_tokens is not None else []
        end = next((position for position, token in enumerate(text) if token in stops), len(text))
        rows.append(prompt + text[:end] + [start])
        opened.append(end == len(text) or text[end] == start)
    return rows, opened


def left_pad(rows: list[list[int]], pad_token_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad_token_id] * (width - len(row)) + row for row in rows], device=device)
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], device=device)
    return ids, mask


@torch.no_grad()
def write_vision_tokens(
    model: SetokimForConditionalGeneration,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.FloatTensor | None,
    max_image_tokens: int,
    **clustering: Any,
) -> WrittenVisionTokens:
    """The vision-token loop over left-padded prompts that end in `[Img]`, on the KV cache.

    One prefill over the prompts (their own images expanded), then one LLM step per vision token: the vision
    head turns the last hidden state into a token, the projector feeds it back, and the LM head's choice
    between another placeholder and `[/Img]` stops each row on its own.
    """
    setokim, config = model.model, model.config
    image_features = None
    if pixel_values is not None:
        prepared = setokim.prepare_multimodal_inputs(
            input_ids, pixel_values, attention_mask, padding_side="left", **clustering
        )
        input_ids, attention_mask, position_ids = prepared.input_ids, prepared.attention_mask, prepared.position_ids
        inputs_embeds = setokim.embed_with_images(prepared.input_ids, prepared.image_embeds)
        image_features = prepared.image_features
    else:
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        inputs_embeds = setokim.embed_with_images(input_ids, None)
    outputs = setokim.language_model(
        inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=True
    )
    batch_size = len(input_ids)
    hidden = outputs.last_hidden_state[:, -1]
    cache, position = outputs.cache, position_ids[:, -1]
    tokens = hidden.new_zeros(batch_size, max_image_tokens, config.setok_config.token_size)
    states = hidden.new_zeros(batch_size, max_image_tokens, hidden.shape[-1])
    counts = torch.zeros(batch_size, dtype=torch.long, device=hidden.device)
    writing = torch.ones(batch_size, dtype=torch.bool, device=hidden.device)
    choices = torch.tensor([config.image_token_id, config.image_end_token_id], device=hidden.device)
    for step in range(max_image_tokens):
        token = model.vision_head(hidden)
        tokens[:, step] = token * writing[:, None].to(token.dtype)
        states[:, step] = hidden * writing[:, None].to(hidden.dtype)
        counts += writing.long()
        if step == max_image_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch_size, 1)], dim=1)
        position = position + 1
        outputs = setokim.language_model(
            inputs_embeds=setokim.multi_modal_projector(token)[:, None],
            attention_mask=attention_mask,
            position_ids=position[:, None],
            cache=cache,
            use_cache=True,
        )
        hidden, cache = outputs.last_hidden_state[:, -1], outputs.cache
        another, close = model.lm_head(hidden)[:, choices].unbind(dim=-1)
        writing &= another >= close
        if not bool(writing.any()):
            break
    width = int(counts.max())
    return WrittenVisionTokens(
        tokens=tokens[:, :width],
        token_mask=torch.arange(width, device=counts.device)[None, :] < counts[:, None],
        num_tokens=counts,
        hidden_states=states[:, :width],
        image_features=image_features,
    )


def written_sequences(
    prompts: list[list[int]], counts: torch.LongTensor, config: SetokimConfig, device: torch.device
) -> torch.LongTensor:
    """Prompt + `[Img]` + one placeholder per written token + `[/Img]`, right-padded with the pad token."""
    rows = [
        prompt + [config.image_token_id] * count + [config.image_end_token_id]
        for prompt, count in zip(prompts, counts.tolist())
    ]
    pad = config.text_config.pad_token_id if config.text_config.pad_token_id is not None else 0
    width = max(map(len, rows))
    return torch.tensor([row + [pad] * (width - len(row)) for row in rows], device=device)


__all__ = ["SetokimImageGenerationOutput", "SetokimVisionHead", "image_regression_loss"]
