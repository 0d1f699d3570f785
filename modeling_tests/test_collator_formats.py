"""The fine-tuning collator reads both published formats: Transformers chat messages and LLaVA/ShareGPT."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from transformers_setok import SetokImageProcessor, SetokimDataCollator, SetokimProcessor
from transformers_setok.placeholder_expansion import IGNORE_INDEX


@pytest.fixture
def processor(tiny_tokenizer_dir: Path) -> SetokimProcessor:
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    return SetokimProcessor(SetokImageProcessor(size={"height": 64, "width": 64}), tokenizer)


def picture(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 40, 3), dtype=np.uint8))


def text(value: str) -> dict:
    return {"type": "text", "text": value}


IMAGE = {"type": "image"}

# The same three conversations, written in each format.
MESSAGES = [
    {
        "images": [picture(0)],
        "messages": [
            {"role": "user", "content": [IMAGE, text("What is shown?")]},
            {"role": "assistant", "content": [text("A red car.")]},
        ],
    },
    {
        "images": [picture(1), picture(2)],
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [IMAGE, IMAGE, text("Compare them.")]},
            {"role": "assistant", "content": "Two cats, then a lake."},
            {"role": "user", "content": "Which is bigger?"},
            {"role": "assistant", "content": "The lake."},
        ],
    },
    {"messages": [{"role": "user", "content": "How many dogs?"}, {"role": "assistant", "content": "3 dogs."}]},
]
SHAREGPT = [
    {
        "image": picture(0),
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown?"},
            {"from": "gpt", "value": "A red car."},
        ],
    },
    {
        "images": [picture(1), picture(2)],
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "<image>\n<image>\nCompare them."},
            {"from": "gpt", "value": "Two cats, then a lake."},
            {"from": "human", "value": "Which is bigger?"},
            {"from": "gpt", "value": "The lake."},
        ],
    },
    {"conversations": [{"from": "human", "value": "How many dogs?"}, {"from": "gpt", "value": "3 dogs."}]},
]


def assert_same_batch(batch: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert batch.keys() == expected.keys()
    for key in expected:
        assert torch.equal(batch[key], expected[key]), key


def test_both_formats_give_identical_batches(processor: SetokimProcessor, caplog: pytest.LogCaptureFixture) -> None:
    collator = SetokimDataCollator(processor)
    with caplog.at_level(logging.WARNING):
        expected = collator(MESSAGES)
    assert not caplog.records
    assert_same_batch(collator(SHAREGPT), expected)
    assert_same_batch(collator([SHAREGPT[0], MESSAGES[1], SHAREGPT[2]]), expected)  # formats mix in a batch
    # The answers are what is labelled: the ShareGPT `gpt` turns, each with its EOS.
    tokenizer = processor.tokenizer
    first_answer = expected["labels"][0][expected["labels"][0] != IGNORE_INDEX].tolist()
    assert tokenizer.decode(first_answer, skip_special_tokens=True).strip() == "A red car."
    assert expected["pixel_values"].shape == (3, 3, 64, 64)


def test_image_paths_are_read_from_the_image_folder(processor: SetokimProcessor, tmp_path: Path) -> None:
    (tmp_path / "coco").mkdir()
    picture(0).save(tmp_path / "coco" / "0001.png")
    rgba = np.zeros((48, 40, 4), dtype=np.uint8)  # fully transparent: white, as the image processor sees it
    Image.fromarray(rgba, "RGBA").save(tmp_path / "clear.png")
    from_paths = {**SHAREGPT[1], "images": ["coco/0001.png", tmp_path / "clear.png"]}
    batch = SetokimDataCollator(processor, image_folder=tmp_path)(
        [{**SHAREGPT[0], "image": "coco/0001.png"}, from_paths]
    )
    in_memory = [{**SHAREGPT[0]}, {**SHAREGPT[1], "images": [picture(0), Image.new("RGB", (40, 48), "white")]}]
    assert_same_batch(batch, SetokimDataCollator(processor)(in_memory))


def test_a_conversation_without_an_answer_is_a_warning(
    processor: SetokimProcessor, caplog: pytest.LogCaptureFixture
) -> None:
    unanswered = [
        {"conversations": [{"from": "human", "value": "<image>\nWhat is shown?"}], "image": picture(0)},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"}]},
    ]
    with caplog.at_level(logging.WARNING):
        batch = SetokimDataCollator(processor)([MESSAGES[0], *unanswered])
    assert (batch["labels"][1:] == IGNORE_INDEX).all() and (batch["labels"][0] != IGNORE_INDEX).any()
    assert "examples[1, 2]: no assistant answer to learn from (every label is -100)" in caplog.text


@pytest.mark.parametrize(
    ("example", "message"),
    [
        ({"conversations": [{"from": "bot", "value": "Hi."}]}, r"\['conversations'\]\[0\]: `from` must be one of"),
        ({"dialogue": []}, r"expected `messages` .* or `conversations` .*got the keys \['dialogue'\]"),
        (
            {"conversations": [{"from": "human", "value": "<image> and <image>?"}], "image": picture(0)},
            r"hold 2 image part\(s\) but `images` holds 1 image\(s\); give one image per .* or <image> marker",
        ),
    ],
)
def test_malformed_examples_are_named(processor: SetokimProcessor, example: dict, message: str) -> None:
    with pytest.raises(ValueError, match=r"examples\[1\]" + ".*" + message):
        SetokimDataCollator(processor)([MESSAGES[2], example])
