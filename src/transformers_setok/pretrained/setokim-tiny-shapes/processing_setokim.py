"""Processor of Setokim: SeTok image processor + text tokenizer + a Vicuna-style chat template.

SeTok turns an image into a variable number of tokens, which only the model knows. So the processor puts exactly
one `<image>` placeholder per image in the text, wrapped as `[Img]<image>[/Img]`, and the model expands each
placeholder into its image's tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers.image_utils import make_flat_list_of_images
from transformers.processing_utils import ProcessorMixin

IMAGE_TOKEN = "<image>"
IMAGE_START_TOKEN = "[Img]"
IMAGE_END_TOKEN = "[/Img]"
WRAPPED_IMAGE_TOKEN = f"{IMAGE_START_TOKEN}{IMAGE_TOKEN}{IMAGE_END_TOKEN}"

# Vicuna v1 layout, as in LLaVA: "USER: <image>\nWhat is shown? ASSISTANT: A cat.</s>USER: ...".
# No BOS here: the tokenizer adds it, so templating and then calling the processor doesn't add it twice.
# `{% generation %}` marks assistant answers (their EOS and the space before them included: some tokenizers keep
# that space as a token of its own, and a model never trained to write it stops at once) for
# `return_assistant_tokens_mask=True`.
DEFAULT_CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}"
    "{%- for item in content -%}"
    "{%- if not loop.first -%}{{ '\\n' }}{%- endif -%}"
    "{%- if item['type'] == 'image' -%}{{ '<image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}"
    "{%- else -%}{{ raise_exception('Setokim chat messages hold text and image content, got ' + item['type']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ render(message['content']) + ' ' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'USER: ' + render(message['content']) + ' ' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ 'ASSISTANT:' }}"
    "{%- generation -%}{{ ' ' + render(message['content']) + eos_token }}{%- endgeneration -%}"
    "{%- else -%}{{ raise_exception('Setokim chat roles are system, user and assistant, got ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)


class SetokimProcessor(ProcessorMixin):
    """Turns images and text (or chat messages) into Setokim inputs: `input_ids`, `attention_mask`, `pixel_values`.

    Each `<image>` in the text becomes `[Img]<image>[/Img]` (placeholders already wrapped that way are kept as they
    are). `images` may be one image, a flat list over the whole batch in order, or one list per prompt; the number of
    images must match the number of placeholders, or a `ValueError` names both. Truncation may never cut into an
    image group: that raises a `ValueError` too. Padding follows the tokenizer's `padding_side`; use left padding for
    batched generation.

    Args:
        image_processor: a [`SetokImageProcessor`].
        tokenizer: any tokenizer; the three image tokens are added to it as special tokens where missing, so the
            model's embeddings must cover `len(tokenizer)`.
        chat_template: Jinja chat template; defaults to a Vicuna-style one (`USER: ... ASSISTANT: ...</s>`).
    """

    image_token = IMAGE_TOKEN
    image_start_token = IMAGE_START_TOKEN
    image_end_token = IMAGE_END_TOKEN

    def __init__(self, image_processor: Any, tokenizer: Any, chat_template: str | None = None) -> None:
        image_tokens = [IMAGE_START_TOKEN, IMAGE_TOKEN, IMAGE_END_TOKEN]
        missing = [token for token in image_tokens if token not in tokenizer.added_tokens_encoder]
        if missing:
            tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
        self.image_start_token_id, self.image_token_id, self.image_end_token_id = tokenizer.convert_tokens_to_ids(
            image_tokens
        )
        super().__init__(image_processor, tokenizer, chat_template=chat_template or DEFAULT_CHAT_TEMPLATE)

    def validate_inputs(
        self, images: Any = None, text: list[str] | None = None, videos: Any = None, audio: Any = None, **kwargs: Any
    ) -> None:
        """Check images against placeholders, per prompt where images come per prompt, naming both arguments."""
        if videos is not None or audio is not None:
            raise TypeError(f"{type(self).__name__} takes `images` and `text`, not `videos` or `audio`")
        if text is not None and all(isinstance(prompt, str) for prompt in text):
            placeholders = [prompt.count(IMAGE_TOKEN) for prompt in text]
            num_images = 0 if images is None else len(make_flat_list_of_images(images))
            if sum(placeholders) != num_images:
                raise ValueError(
                    f"`text` holds {sum(placeholders)} {IMAGE_TOKEN} placeholder(s) (per prompt: {placeholders}) but "
                    f"`images` holds {num_images} image(s): put one {IMAGE_TOKEN} in `text` where each image goes"
                )
            images_per_prompt = [len(prompt_images) for prompt_images in images] if is_per_prompt(images) else None
            if images_per_prompt not in (None, placeholders):
                raise ValueError(
                    f"`images` given per prompt hold {images_per_prompt} image(s) but the prompts in `text` hold "
                    f"{placeholders} {IMAGE_TOKEN} placeholder(s)"
                )
        super().validate_inputs(images=images, text=text, **kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        """One placeholder per image, whatever its size: the model expands it into the image's tokens."""
        return WRAPPED_IMAGE_TOKEN

    def get_text_with_replacements(
        self, text: list[str], images_replacements: Sequence[str] = (), *args: Any, **kwargs: Any
    ) -> tuple[list[str], list[list[dict[str, Any]]]]:
        """Like the base method, but keeps placeholders the caller already wrapped, so none is wrapped twice.

        A dry run of the base method finds the placeholders it will replace (it skips control tokens marked as user
        text); those already inside `[Img]...[/Img]` are then replaced by themselves, which keeps the offsets exact.
        """
        _, offsets = super().get_text_with_replacements(list(text), images_replacements, *args, **kwargs)
        placeholders = [
            (prompt, replacement["span"])
            for prompt, replacements in zip(text, offsets)
            for replacement in replacements
            if replacement["type"] == "image"
        ]
        images_replacements = [
            IMAGE_TOKEN if is_wrapped(prompt, start, end) else wrapped
            for (prompt, (start, end)), wrapped in zip(placeholders, images_replacements)
        ]
        return super().get_text_with_replacements(text, images_replacements, *args, **kwargs)

    def post_process_masks(
        self, outputs: Any, target_sizes: Sequence[tuple[int, int]], threshold: float = 0.0
    ) -> list[torch.BoolTensor]:
        """`segment`'s mask logits back at each original image's `(height, width)`, as boolean masks.

        The image processor resized every image to the model's square input without cropping, so undoing it is
        a resize of the logits (bilinear) to each image's own size; a pixel is in the mask where its logit exceeds
        `threshold`. `outputs` is a `SetokimSegmentationOutput` (or its `mask_logits`).
        """
        logits = outputs.mask_logits if hasattr(outputs, "mask_logits") else outputs
        check_target_sizes(target_sizes, len(logits))
        return [
            torch.nn.functional.interpolate(row[None, None].float(), size=tuple(size), mode="bilinear")[0, 0]
            > threshold
            for row, size in zip(logits, target_sizes)
        ]

    def token_masks(self, tokenizer_output: Any, target_sizes: Sequence[tuple[int, int]]) -> list[torch.BoolTensor]:
        """One mask per token of each image, `(num_tokens, height, width)` at the image's own size.

        From the tokenizer's patch assignment (`SetokModelOutput`, or a Setokim's `image_features.tokenizer_output`):
        every pixel takes the token of the patch it falls in, so an image's token masks partition it.
        """
        assignment, counts = tokenizer_output.assignment, tokenizer_output.num_tokens.tolist()
        check_target_sizes(target_sizes, len(assignment))
        grids = assignment.view(len(assignment), 1, *tokenizer_output.grid_size).float()
        masks = []
        for grid, count, size in zip(grids, counts, target_sizes):
            labels = torch.nn.functional.interpolate(grid[None], size=tuple(size), mode="nearest")[0, 0].long()
            masks.append(labels[None] == torch.arange(count, device=labels.device)[:, None, None])
        return masks

    def _check_special_mm_tokens(self, text: list[str], text_inputs: Any, modalities: list[str]) -> None:
        """Truncation must keep every `[Img]<image>[/Img]` whole: the model cannot place a cut or missing image."""
        message = (
            f"Truncation would cut through an image: every {WRAPPED_IMAGE_TOKEN} group "
            "must fit in `max_length`; raise `max_length`, pass `truncation=False`, or shorten the text"
        )
        try:
            super()._check_special_mm_tokens(text, text_inputs, modalities)  # counts the placeholders that survived
        except ValueError as error:
            raise ValueError(message) from error
        input_ids = text_inputs["input_ids"]
        for ids in input_ids.tolist() if hasattr(input_ids, "tolist") else input_ids:
            for position, token_id in enumerate(ids):
                if token_id == self.image_token_id and not (
                    0 < position < len(ids) - 1
                    and ids[position - 1] == self.image_start_token_id
                    and ids[position + 1] == self.image_end_token_id
                ):
                    raise ValueError(message)


def check_target_sizes(target_sizes: Sequence[tuple[int, int]], batch_size: int) -> None:
    """One `(height, width)` per image, or a `ValueError` naming `target_sizes`."""
    if len(target_sizes) != batch_size or any(len(size) != 2 for size in target_sizes):
        raise ValueError(
            f"target_sizes must hold one (height, width) per image: {batch_size} expected, got {list(target_sizes)}"
        )


def is_wrapped(prompt: str, start: int, end: int) -> bool:
    """Whether the placeholder at `prompt[start:end]` sits right between `[Img]` and `[/Img]`."""
    return prompt.endswith(IMAGE_START_TOKEN, 0, start) and prompt.startswith(IMAGE_END_TOKEN, end)


def is_per_prompt(images: Any) -> bool:
    """Whether `images` holds one list of images per prompt rather than images."""
    nested = isinstance(images, (list, tuple)) and bool(images)
    return nested and all(isinstance(item, (list, tuple)) for item in images)


__all__ = ["IMAGE_END_TOKEN", "IMAGE_START_TOKEN", "IMAGE_TOKEN", "WRAPPED_IMAGE_TOKEN", "SetokimProcessor"]
