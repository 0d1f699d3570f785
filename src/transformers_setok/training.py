"""Fine-tuning Setokim with the stock `Trainer`: a chat data collator, freezing by part, and LoRA on the LLM.

The collator writes one `[Img]<image>[/Img]` placeholder per image and labels only the assistant answers; the
model expands each placeholder into its image's tokens (labelled `-100`) in `forward`, so nothing here needs
to know how many tokens an image becomes.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from peft import LoraConfig, PeftModel, TaskType
from PIL import Image
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from transformers.utils import logging

from .image_processing_setok import load_image, to_rgb
from .modeling_setokim import SetokimForConditionalGeneration
from .placeholder_expansion import IGNORE_INDEX
from .processing_setokim import IMAGE_TOKEN, SetokimProcessor

logger = logging.get_logger(__name__)

# PIL modes whose pixels are one number each (a palette image's are its palette indices).
SINGLE_CHANNEL_MODES = ("1", "L", "P", "I", "I;16", "F")

# LLaVA / ShareGPT speaker names (`"from"`) and the chat roles they stand for.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class SetokimDataCollator:
    """Turns chat examples into a padded training batch: `input_ids`, `attention_mask`, `labels`, `pixel_values`.

    An example comes in either of the two formats instruction data is published in:

    * Transformers chat messages: `{"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text",
      "text": "What is shown?"}]}, {"role": "assistant", "content": "A red car."}], "images": [image]}`;
    * LLaVA / ShareGPT: `{"conversations": [{"from": "human", "value": "<image>\\nWhat is shown?"}, {"from": "gpt",
      "value": "A red car."}], "image": "coco/0001.jpg"}` (speakers `human`, `gpt`, `system`; an `<image>` in the
      text where each image goes; `image` for one image or `images` for several).

    Images are PIL images, arrays, or file paths (relative ones resolved against `image_folder`), in the order of
    the image parts and `<image>` markers. Labels are `-100` everywhere except the assistant answers and their EOS,
    found through the chat template's `{% generation %}` markers; a conversation with no answer to learn from gets
    a warning. `pixel_values` is left out when the batch holds no image.

    A referring-segmentation example adds `"mask"`: the referred region of its (last) image, at the image's size (a
    boolean or 0/1 array, tensor or image, or the path of an image file, relative ones resolved like image paths,
    whose nonzero pixels are the region). The collator then appends the answer, an image of that region alone (the
    image with everything outside the mask greyed out), whose SeTok tokens are the ones the model learns to write,
    and adds `target_masks` (`(segmentation rows, height, width)`, resized to `mask_size`) and `target_mask_rows`
    to the batch, for the mask decoder's loss.

    `max_length` bounds the *text* tokens, each image counting as its three placeholder tokens: the model adds
    the image's own tokens on top in `forward`. A conversation that is too long loses whole trailing turns (a
    user message and the replies after it), never part of one, so no image is ever cut; a warning says how many
    turns went. If even the first turn does not fit, a `ValueError` says so.

    Args:
        processor: the model's [`SetokimProcessor`]; its chat template must mark answers with `{% generation %}`.
        max_length: most text tokens per example; `None` keeps every conversation whole.
        padding_side: `"right"` for training (the default), `"left"` to match a generation layout.
        image_folder: folder that relative image paths are read from (LLaVA's `--image_folder`); by default the
            working directory.
        mask_size: `(height, width)` target masks are resized to; the image processor's size by default.
    """

    processor: SetokimProcessor
    max_length: int | None = None
    padding_side: Literal["left", "right"] = "right"
    image_folder: str | os.PathLike | None = None
    mask_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length must be a positive number of tokens or None, got {self.max_length}")

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("examples: got an empty batch")
        masks = [read_mask(example.get("mask"), self.image_folder) for example in examples]
        encoded, dropped_turns = zip(
            *(self.encode(example, index, mask) for index, (example, mask) in enumerate(zip(examples, masks)))
        )
        if any(dropped_turns):
            logger.warning(
                f"Dropped {sum(dropped_turns)} trailing turn(s) from {sum(map(bool, dropped_turns))} of "
                f"{len(examples)} conversation(s) to fit max_length={self.max_length} text tokens"
            )
        tokenizer = self.processor.tokenizer
        # Padding is masked out of attention and loss, so any id works where the tokenizer has no pad token.
        pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        labels = [item["input_ids"][0].masked_fill(item["assistant_masks"][0] == 0, IGNORE_INDEX) for item in encoded]
        unlabelled = [index for index, example_labels in enumerate(labels) if (example_labels == IGNORE_INDEX).all()]
        if unlabelled:
            logger.warning(
                f"examples{unlabelled}: no assistant answer to learn from (every label is -100); each conversation "
                "needs an assistant turn (role 'assistant', or 'gpt' in ShareGPT data)"
            )
        batch = {
            "input_ids": self.pad([item["input_ids"][0] for item in encoded], pad_token_id),
            "attention_mask": self.pad([item["attention_mask"][0] for item in encoded], 0),
            "labels": self.pad(labels, IGNORE_INDEX),
        }
        pixel_values = [item["pixel_values"] for item in encoded if "pixel_values" in item]
        if pixel_values:
            batch["pixel_values"] = torch.cat(pixel_values)
        if any(mask is not None for mask in masks):
            size = self.mask_size or (
                self.processor.image_processor.size.height,
                self.processor.image_processor.size.width,
            )
            batch["target_masks"] = torch.stack([resized_mask(mask, size) for mask in masks if mask is not None])
            batch["target_mask_rows"] = torch.tensor([mask is not None for mask in masks])
        return batch

    def encode(self, example: dict[str, Any], index: int, mask: Any = None) -> tuple[dict[str, torch.Tensor], int]:
        """Tokenize one conversation (a referring one when `mask`, its region, is given), dropping whole trailing
        turns until it fits; returns it and the turns dropped."""
        messages, images = chat_messages(example, index)
        if not messages:
            raise ValueError(f"examples[{index}]: the conversation is empty")
        if count_images(messages) != len(images):
            raise ValueError(
                f"examples[{index}]: `messages` hold {count_images(messages)} image part(s) but `images` holds "
                f"{len(images)} image(s); give one image per {{'type': 'image'}} part or {IMAGE_TOKEN} marker, "
                "in order"
            )
        images = [self.read_image(image) for image in images]
        if mask is not None:
            messages, images = with_region_answer(messages, images, mask, index)
        # A turn ends where the next user message starts; system messages before the first user stay with it.
        user_starts = [position for position, message in enumerate(messages) if message["role"] == "user"]
        turn_ends = [*user_starts[1:], len(messages)]
        for kept in range(len(turn_ends), 0, -1):
            kept_messages = messages[: turn_ends[kept - 1]]
            encoded = self.processor.apply_chat_template(
                kept_messages,
                tokenize=True,
                return_dict=True,
                return_assistant_tokens_mask=True,
                return_tensors="pt",
                processor_kwargs={"images": images[: count_images(kept_messages)]},
            )
            if self.max_length is None or encoded["input_ids"].shape[1] <= self.max_length:
                return encoded, len(turn_ends) - kept
        raise ValueError(
            f"examples[{index}]: its first turn alone is {encoded['input_ids'].shape[1]} text tokens, more than "
            f"max_length={self.max_length}; raise max_length or shorten that turn"
        )

    def read_image(self, image: Any) -> Any:
        return read_image(image, self.image_folder)

    def pad(self, sequences: list[torch.Tensor], value: int) -> torch.Tensor:
        return pad_sequence(sequences, batch_first=True, padding_value=value, padding_side=self.padding_side)


def data_path(path: str | os.PathLike, image_folder: str | os.PathLike | None) -> Path:
    """Where a data file is: relative paths are read from `image_folder` (or the working directory)."""
    path = Path(path)
    return path if image_folder is None or path.is_absolute() else Path(image_folder) / path


def read_image(image: Any, image_folder: str | os.PathLike | None) -> Any:
    """A path (see `data_path`) read as an RGB image; images as they are."""
    return load_image(data_path(image, image_folder)) if isinstance(image, (str, os.PathLike)) else image


def read_mask(mask: Any, image_folder: str | os.PathLike | None) -> Any:
    """A mask file's path (see `data_path`) read as a boolean array whose nonzero pixels (palette indices in a
    palette image, any channel in a colour one) are the object; masks as they are. JSON data holds masks so."""
    if not isinstance(mask, (str, os.PathLike)):
        return mask
    with Image.open(data_path(mask, image_folder)) as image:
        array = np.asarray(image if image.mode in SINGLE_CHANNEL_MODES else image.convert("RGB"))
    return (array.any(axis=-1) if array.ndim == 3 else array) != 0


def chat_messages(example: dict[str, Any], index: int) -> tuple[list[dict[str, Any]], list[Any]]:
    """An example's conversation as Transformers chat messages, and its images, from either format."""
    if "messages" in example:
        return list(example["messages"]), list(example.get("images") or [])
    if "conversations" not in example:
        raise ValueError(
            f"examples[{index}]: expected `messages` (Transformers chat format) or `conversations` (LLaVA/ShareGPT "
            f"format), got the keys {sorted(example)}"
        )
    messages = []
    for position, entry in enumerate(example["conversations"]):
        if entry.get("from") not in SHAREGPT_ROLES:
            raise ValueError(
                f"examples[{index}]['conversations'][{position}]: `from` must be one of {sorted(SHAREGPT_ROLES)}, got "
                f"{entry.get('from')!r}"
            )
        messages.append({"role": SHAREGPT_ROLES[entry["from"]], "content": entry["value"]})
    images = example.get("images")
    if images is None:
        images = [] if example.get("image") is None else [example["image"]]
    return messages, list(images) if isinstance(images, (list, tuple)) else [images]


def mask_tensor(mask: Any) -> torch.Tensor:
    """A mask (bool or 0/1 array, tensor, or image) as a `(height, width)` float tensor of 0 and 1."""
    array = np.asarray(mask.convert("L") if isinstance(mask, Image.Image) else mask, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"mask: expected a (height, width) mask, got shape {array.shape}")
    return torch.from_numpy((array > 0.5 * max(float(array.max()), 1e-6)).astype(np.float32))


def resized_mask(mask: Any, size: tuple[int, int]) -> torch.Tensor:
    """A mask at `(height, width)`: resized by area, then thresholded at one half."""
    resized = torch.nn.functional.interpolate(mask_tensor(mask)[None, None], size=tuple(size), mode="area")[0, 0]
    return (resized >= 0.5).float()


def with_region_answer(
    messages: list[dict[str, Any]], images: list[Any], mask: Any, index: int
) -> tuple[list[dict[str, Any]], list[Any]]:
    """A referring example with its answer appended: the last image's region alone, outside the mask greyed."""
    if not images:
        raise ValueError(f"examples[{index}]: `mask` needs an image to segment in")
    if messages[-1]["role"] == "assistant":
        raise ValueError(
            f"examples[{index}]: with `mask`, the answer is the region; end the conversation with the user"
        )
    image = np.asarray(to_rgb(images[-1]) if isinstance(images[-1], Image.Image) else images[-1])
    region = mask_tensor(mask).numpy()
    if region.shape != image.shape[:2]:
        raise ValueError(
            f"examples[{index}]: `mask` is {region.shape} but its image is {image.shape[:2]} (height, width)"
        )
    grey = np.full_like(image, 128)
    region_image = Image.fromarray(np.where(region[..., None] > 0, image, grey).astype(np.uint8))
    answer = {"role": "assistant", "content": [{"type": "image"}]}
    return [*messages, answer], [*images, region_image]


def count_images(messages: Sequence[dict[str, Any]]) -> int:
    """Number of images chat messages place: `{"type": "image"}` parts and `<image>` markers in their text."""
    count = 0
    for message in messages:
        content = message["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for part in parts:
            count += 1 if part["type"] == "image" else part.get("text", "").count(IMAGE_TOKEN)
    return count


def model_parts(model: SetokimForConditionalGeneration | PeftModel) -> dict[str, list[nn.Module]]:
    """The modules of each trainable part of a Setokim, peft-wrapped or not (the heads only where it has them)."""
    setokim = model.get_base_model() if isinstance(model, PeftModel) else model
    if not isinstance(setokim, SetokimForConditionalGeneration):
        raise TypeError(
            f"model must be a SetokimForConditionalGeneration or a PeftModel of one, got {type(model).__name__}"
        )
    setok = setokim.model.setok
    return {
        "vision_encoder": [setok.vision_model],
        "merger": [setok.input_projection, setok.merger],
        "projector": [setokim.model.multi_modal_projector],
        "language_model": [setokim.model.language_model, setokim.lm_head],
        **{
            part: [getattr(setokim, part)]
            for part in ("vision_head", "mask_decoder", "detokenizer")
            if getattr(setokim, part) is not None
        },
    }


def set_trainable(
    model: SetokimForConditionalGeneration | PeftModel,
    vision_encoder: bool = False,
    merger: bool = True,
    projector: bool = True,
    language_model: bool = True,
    vision_head: bool = True,
    mask_decoder: bool = True,
    detokenizer: bool = False,
) -> dict[str, int]:
    """Choose which parts of a Setokim train, and return the trainable parameter count of each part it has.

    A new Setokim starts with its vision encoder frozen; the defaults keep it so and train everything else but
    the detokenizer, which stage 1 trains with the tokenizer (the heads count only where the model has them). On a
    `PeftModel`, an enabled part that holds adapter weights (LoRA layers, `modules_to_save` copies) trains only
    those, since keeping its base weights frozen is the point of the adapter; an enabled part without adapters
    trains in full.
    """
    enabled = {
        "vision_encoder": vision_encoder,
        "merger": merger,
        "projector": projector,
        "language_model": language_model,
        "vision_head": vision_head,
        "mask_decoder": mask_decoder,
        "detokenizer": detokenizer,
    }
    # peft keeps adapter weights under their adapter's name: `lora_A.default.weight`, `modules_to_save.default.0.bias`.
    adapter_names = set(model.peft_config) if isinstance(model, PeftModel) else set()
    counts = {}
    for part, modules in model_parts(model).items():
        # Keyed by identity, so a tied LM head and input embedding count once.
        parameters = {id(p): (name, p) for module in modules for name, p in module.named_parameters()}.values()
        adapters = {id(p) for name, p in parameters if not adapter_names.isdisjoint(name.split("."))}
        for _, parameter in parameters:
            parameter.requires_grad_(enabled[part] and (id(parameter) in adapters or not adapters))
        counts[part] = sum(p.numel() for _, p in parameters if p.requires_grad)
    return counts


# The part names `set_trainable` takes (and `model_parts` keys the parts by), for configs that name parts.
TRAINABLE_PARTS = tuple(inspect.signature(set_trainable).parameters)[1:]


def language_model_lora_config(
    r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
    **kwargs: Any,
) -> LoraConfig:
    """A `LoraConfig` that adapts only the language model's `target_modules`, for `get_peft_model(setokim, ...)`.

    Plain module names would also match same-named layers of the vision encoder (SigLIP has `q_proj` too), so the
    targets are a regex anchored under `model.language_model.`; the vision tokenizer and projector stay as they
    are. Extra `kwargs` go to `LoraConfig`, e.g. `modules_to_save=["multi_modal_projector"]` to also train (and
    save) a full copy of the projector.
    """
    names = "|".join(re.escape(name) for name in target_modules)
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=rf"model\.language_model\..*\.({names})",
        task_type=TaskType.CAUSAL_LM,
        **kwargs,
    )


__all__ = ["TRAINABLE_PARTS", "SetokimDataCollator", "language_model_lora_config", "model_parts", "set_trainable"]
