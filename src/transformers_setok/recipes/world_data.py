"""The shapes world as training examples for each stage of the recipe, and the prompts that ask for each task.

Stage 1 reads images and their concept phrases (`SetokPretrainingCollator`); stages 2 and 3 read chat
conversations in the Transformers format that `SetokimDataCollator` takes, so the same collator serves the
shapes world and a user's own LLaVA-style data. Evaluation and the demo ask with the same prompts the model was
trained on (`caption_request`, `draw_request`, `segment_request`, `edit_request`).
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from ..image_processing_setok import SetokImageProcessor
from ..processing_setokim import SetokimProcessor
from ..shapes_world import TASKS
from ..training import read_image

CAPTION_REQUEST = "Describe the image."


def caption_request() -> str:
    return CAPTION_REQUEST


def draw_request(prompt: str) -> str:
    return f"Draw {prompt}."


def segment_request(expression: str) -> str:
    return f"Segment {expression}."


def edit_request(instruction: str) -> str:
    return f"{instruction[0].upper()}{instruction[1:]}."


def user_turn(text: str, with_image: bool) -> dict[str, Any]:
    content = [{"type": "image"}] if with_image else []
    return {"role": "user", "content": [*content, {"type": "text", "text": text}]}


def answer_turn(text: str | None) -> dict[str, Any]:
    """An assistant turn: `text`, or an image to write when `None`."""
    return {"role": "assistant", "content": text if text is not None else [{"type": "image"}]}


def task_examples(task: str, record: Mapping[str, Any]) -> dict[str, Any]:
    """One chat example of `task` from one shapes-world record."""
    if task == "captions":
        return {
            "messages": [user_turn(caption_request(), True), answer_turn(record["caption"])],
            "images": [record["image"]],
        }
    if task == "questions":
        return {
            "messages": [user_turn(record["question"], True), answer_turn(record["answer"])],
            "images": [record["image"]],
        }
    if task == "referring":
        # the collator appends the answer: the image of the referred region alone, and its mask
        return {
            "messages": [user_turn(segment_request(record["expression"]), True)],
            "images": [record["image"]],
            "mask": record["mask"],
        }
    if task == "editing":
        return {
            "messages": [user_turn(edit_request(record["instruction"]), True), answer_turn(None)],
            "images": [record["source_image"], record["edited_image"]],
        }
    if task == "text_to_image":
        return {
            "messages": [user_turn(draw_request(record["prompt"]), False), answer_turn(None)],
            "images": [record["image"]],
        }
    raise ValueError(f"`task` must be one of {TASKS}, got {task!r}")


def chat_examples(world: datasets.DatasetDict, weights: Mapping[str, float]) -> list[dict[str, Any]]:
    """Chat examples of each task in `weights`, `weight` times its records (a fraction takes the first ones, a
    weight above 1 repeats them), task after task; the `Trainer` shuffles them."""
    examples = []
    for task, weight in weights.items():
        if weight < 0:
            raise ValueError(f"task weights must be >= 0, got {task}: {weight}")
        if task not in world:
            raise ValueError(f"task {task!r} is not in the world's datasets {sorted(world)}")
        records = world[task]
        count = math.ceil(weight * len(records))
        examples += [task_examples(task, record) for record in itertools.islice(itertools.cycle(records), count)]
    return examples


def world_texts(world: datasets.DatasetDict) -> Iterable[str]:
    """Every text of a world and the requests around them, for training a tokenizer on."""
    yield from ("USER: ASSISTANT:", caption_request())
    columns = {
        "captions": ("caption",),
        "questions": ("question", "answer"),
        "referring": ("expression",),
        "editing": ("instruction",),
        "text_to_image": ("prompt",),
    }
    for task, names in columns.items():
        if task in world:
            for name in names:
                yield from world[task][name]
    if "captions" in world:
        yield from (phrase for phrases in world["captions"]["concepts"] for phrase in phrases)
    if "text_to_image" in world:
        yield from (draw_request(prompt) for prompt in world["text_to_image"]["prompt"])
    if "referring" in world:
        yield from (segment_request(expression) for expression in world["referring"]["expression"])
    if "editing" in world:
        yield from (edit_request(instruction) for instruction in world["editing"]["instruction"])


def chat_inputs(
    processor: SetokimProcessor, requests: Sequence[str], images: Sequence[Image.Image] | None
) -> dict[str, torch.Tensor]:
    """Left-padded generation inputs: one user turn per request (with its image, when given), then `ASSISTANT:`."""
    content = [{"type": "image"}] if images is not None else []
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [*content, {"type": "text", "text": request}]}], add_generation_prompt=True
        )
        for request in requests
    ]
    processor.tokenizer.padding_side = "left"
    kwargs = {"images": list(images)} if images is not None else {}
    return processor(text=prompts, padding=True, return_tensors="pt", **kwargs)


@dataclass
class SetokPretrainingCollator:
    """Stage-1 batches: `pixel_values` of each example's `image`, and its `concepts` phrases as padded ids.

    Phrases become `concept_input_ids` / `concept_attention_mask` of shape `(batch, max_phrases, length)`: an
    image with fewer phrases gets all-zero mask rows (padding the contrastive loss skips), one with more keeps the
    first `max_phrases`. Images are PIL images or paths (relative ones resolved against `image_folder`).
    """

    image_processor: SetokImageProcessor
    tokenizer: PreTrainedTokenizerBase
    max_phrases: int = 8
    image_folder: str | os.PathLike | None = None

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("examples: got an empty batch")
        images = [read_image(example["image"], self.image_folder) for example in examples]
        pixel_values = self.image_processor(images=images, return_tensors="pt").pixel_values
        phrases = [list(example["concepts"])[: self.max_phrases] for example in examples]
        if not all(phrases):
            raise ValueError("every example needs at least one concept phrase")
        # right padding whatever the tokenizer's side: phrase encoders pool the first (BERT, SigLIP) or the EOS token
        flat = self.tokenizer(
            [phrase for row in phrases for phrase in row], padding=True, padding_side="right", return_tensors="pt"
        )
        length = flat.input_ids.shape[1]
        input_ids = torch.full((len(examples), self.max_phrases, length), self.tokenizer.pad_token_id)
        attention_mask = torch.zeros((len(examples), self.max_phrases, length), dtype=torch.long)
        rows = torch.repeat_interleave(torch.arange(len(examples)), torch.tensor([len(row) for row in phrases]))
        slots = torch.cat([torch.arange(len(row)) for row in phrases])
        input_ids[rows, slots] = flat.input_ids
        attention_mask[rows, slots] = flat.attention_mask
        return {"pixel_values": pixel_values, "concept_input_ids": input_ids, "concept_attention_mask": attention_mask}


__all__ = [
    "SetokPretrainingCollator",
    "caption_request",
    "chat_examples",
    "chat_inputs",
    "draw_request",
    "edit_request",
    "segment_request",
    "task_examples",
    "world_texts",
]
