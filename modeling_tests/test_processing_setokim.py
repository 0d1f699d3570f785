"""The tiny trained tokenizer and SetokimProcessor: one wrapped placeholder per image, chat template, truncation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SAMPLE_TEXTS
from transformers import AutoTokenizer

from transformers_setok import SetokImageProcessor
from transformers_setok.processing_setokim import IMAGE_TOKEN, WRAPPED_IMAGE_TOKEN, SetokimProcessor
from transformers_setok.tokenizer_training import train_sentencepiece_tokenizer

ROUND_TRIP_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "USER: What is shown in the image? ASSISTANT: A red car.",
    "  leading, double  and trailing spaces  ",
    "Line one\nline two\n\ttabbed 12345",
    "Unseen characters: ünïcödé, 漢字, emoji 🐈 and ∑ symbols",
]


@pytest.fixture
def processor(tiny_tokenizer_dir: Path) -> SetokimProcessor:
    """A fresh tokenizer per test, since the processor adds its image tokens to the tokenizer it gets."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    return SetokimProcessor(SetokImageProcessor(size={"height": 16, "width": 16}), tokenizer)


def image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)


def image_groups(ids: list[int], processor: SetokimProcessor) -> list[int]:
    """Positions of the placeholders, checking each sits inside its own `[Img] ... [/Img]`."""
    positions = [position for position, token_id in enumerate(ids) if token_id == processor.image_token_id]
    for position in positions:
        assert ids[position - 1 : position + 2] == [
            processor.image_start_token_id,
            processor.image_token_id,
            processor.image_end_token_id,
        ]
    assert ids.count(processor.image_start_token_id) == ids.count(processor.image_end_token_id) == len(positions)
    return positions


# Tokenizer


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_tokenizer_round_trips_text(tiny_tokenizer_dir: Path, text: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_has_llama_special_tokens_and_merges(tiny_tokenizer_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert (tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<unk>",
        "<s>",
        "</s>",
        "<pad>",
    )
    special_ids = (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert special_ids == (0, 1, 2, 3)
    assert len(tokenizer) == 400
    text = "What is shown in the image?"
    assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) < len(text)  # BPE merges, not bytes


def test_tokenizer_training_is_reproducible(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    returned = train_sentencepiece_tokenizer(SAMPLE_TEXTS, tmp_path, vocab_size=400)
    loaded = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert returned.get_vocab() == loaded.get_vocab()
    assert returned(ROUND_TRIP_TEXTS)["input_ids"] == loaded(ROUND_TRIP_TEXTS)["input_ids"]


@pytest.mark.parametrize(
    ("texts", "vocab_size", "match"),
    [([], 400, "texts"), (["", ""], 400, "texts"), (SAMPLE_TEXTS, 260, "vocab_size")],
)
def test_tokenizer_training_rejects_bad_input(tmp_path: Path, texts: list[str], vocab_size: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        train_sentencepiece_tokenizer(texts, tmp_path, vocab_size=vocab_size)


# Special tokens


def test_image_tokens_are_single_special_ids(tiny_tokenizer_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tokenizer.add_special_tokens({"extra_special_tokens": ["<seg>"]})
    processor = SetokimProcessor(SetokImageProcessor(), tokenizer)
    ids = [processor.image_start_token_id, processor.image_token_id, processor.image_end_token_id]
    assert len(set(ids)) == 3 and min(ids) >= 400 and len(tokenizer) == 404
    assert tokenizer(f"a{WRAPPED_IMAGE_TOKEN}b", add_special_tokens=False)["input_ids"][1:4] == ids
    assert "<seg>" in tokenizer.extra_special_tokens  # the tokenizer's own special tokens stay
    assert tokenizer.decode(ids, skip_special_tokens=True) == ""

    SetokimProcessor(SetokImageProcessor(), tokenizer)  # a second processor on the same tokenizer adds nothing
    assert len(tokenizer) == 404


def test_model_input_names(processor: SetokimProcessor) -> None:
    assert sorted(processor.model_input_names) == ["attention_mask", "input_ids", "pixel_values"]


# Placeholders


def test_each_image_becomes_one_wrapped_placeholder(processor: SetokimProcessor) -> None:
    prompts = [
        f"USER: {IMAGE_TOKEN}\nCompare with {IMAGE_TOKEN} please. ASSISTANT:",
        "USER: no image here. ASSISTANT:",
    ]
    inputs = processor(images=[image(0), image(1)], text=prompts, padding=True, return_tensors="pt")
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values"}
    assert inputs["pixel_values"].shape == (2, 3, 16, 16)
    assert inputs["input_ids"].shape == inputs["attention_mask"].shape and inputs["input_ids"].shape[0] == 2
    expected = processor.image_processor([image(0), image(1)], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(inputs["pixel_values"], expected, rtol=0, atol=0)

    rows = [row[mask.bool()].tolist() for row, mask in zip(inputs["input_ids"], inputs["attention_mask"])]
    assert [len(image_groups(row, processor)) for row in rows] == [2, 0]
    wrapped_prompt = prompts[0].replace(IMAGE_TOKEN, WRAPPED_IMAGE_TOKEN)
    assert processor.decode(rows[0], skip_special_tokens=False) == "<s>" + wrapped_prompt
    assert processor.batch_decode(rows, skip_special_tokens=True) == [
        prompts[0].replace(IMAGE_TOKEN, ""),
        prompts[1],
    ]


def test_padding_follows_the_tokenizer(processor: SetokimProcessor) -> None:
    prompts = [f"{IMAGE_TOKEN} a long prompt with many words", f"{IMAGE_TOKEN} short"]
    for side in ("left", "right"):
        processor.tokenizer.padding_side = side
        mask = processor(images=[image(0), image(1)], text=prompts, padding=True, return_tensors="pt")[
            "attention_mask"
        ]
        assert mask[1, 0 if side == "left" else -1] == 0 and mask[0].all()


def test_images_flat_per_prompt_or_single_agree(processor: SetokimProcessor) -> None:
    prompts = [f"{IMAGE_TOKEN}{IMAGE_TOKEN} two images", "none", f"one {IMAGE_TOKEN}"]
    flat = processor(images=[image(0), image(1), image(2)], text=prompts)
    per_prompt = processor(images=[[image(0), image(1)], [], [image(2)]], text=prompts)
    assert flat["input_ids"] == per_prompt["input_ids"]
    np.testing.assert_array_equal(np.stack(flat["pixel_values"]), np.stack(per_prompt["pixel_values"]))

    single = processor(images=image(0), text=f"one {IMAGE_TOKEN}", return_tensors="pt")
    assert single["pixel_values"].shape == (1, 3, 16, 16)
    assert len(image_groups(single["input_ids"][0].tolist(), processor)) == 1


def test_text_only_gives_no_pixel_values(processor: SetokimProcessor) -> None:
    inputs = processor(text=["just text", "more text"])
    assert set(inputs) == {"input_ids", "attention_mask"}


def test_already_wrapped_placeholders_are_not_wrapped_again(processor: SetokimProcessor) -> None:
    images = [image(0), image(1)]
    mixed = processor(images=images, text=f"{WRAPPED_IMAGE_TOKEN} and {IMAGE_TOKEN}")
    bare = processor(images=images, text=f"{IMAGE_TOKEN} and {IMAGE_TOKEN}")
    assert mixed["input_ids"] == bare["input_ids"]
    assert len(image_groups(mixed["input_ids"][0], processor)) == 2


@pytest.mark.parametrize(
    ("num_images", "prompts"),
    [
        (2, [f"one {IMAGE_TOKEN}", "none"]),  # too many images
        (1, [f"{IMAGE_TOKEN} and {IMAGE_TOKEN}", f"{IMAGE_TOKEN}"]),  # too few images
        (0, [f"{IMAGE_TOKEN} but no image passed"]),  # none
        (1, ["a placeholder is missing"]),
    ],
)
def test_images_and_placeholders_must_match(processor: SetokimProcessor, num_images: int, prompts: list[str]) -> None:
    images = [image(index) for index in range(num_images)] or None
    with pytest.raises(ValueError, match=r"`text` holds .* `images` holds"):
        processor(images=images, text=prompts)


def test_images_per_prompt_must_match_each_prompt(processor: SetokimProcessor) -> None:
    prompts = [f"{IMAGE_TOKEN}{IMAGE_TOKEN}", "none"]
    with pytest.raises(ValueError, match="per prompt"):
        processor(images=[[image(0)], [image(1)]], text=prompts)


def test_videos_are_refused(processor: SetokimProcessor) -> None:
    with pytest.raises(TypeError, match="videos"):
        processor(text="a video", videos=[np.zeros((2, 8, 8, 3), dtype=np.uint8)])


# Truncation


def test_truncation_never_cuts_an_image(processor: SetokimProcessor) -> None:
    text = f"USER: {IMAGE_TOKEN}\nWhat is shown in the image? ASSISTANT:"
    full = processor(images=image(), text=text)["input_ids"][0]
    (placeholder,) = image_groups(full, processor)
    keeps_image = placeholder + 2  # up to and with `[/Img]`
    for max_length in range(placeholder - 2, len(full) + 1):
        if max_length < keeps_image:
            with pytest.raises(ValueError, match="[Tt]runcat"):
                processor(images=image(), text=text, truncation=True, max_length=max_length)
        else:
            kept = processor(images=image(), text=text, truncation=True, max_length=max_length)["input_ids"][0]
            assert kept == full[:max_length]


def test_left_truncation_never_cuts_an_image(processor: SetokimProcessor) -> None:
    processor.tokenizer.truncation_side = "left"
    text = f"A long question about the picture first {IMAGE_TOKEN} done"
    full = processor(images=image(), text=text, add_special_tokens=False)["input_ids"][0]
    (placeholder,) = image_groups(full, processor)
    keeps_image = len(full) - (placeholder - 1)
    kept = processor(images=image(), text=text, add_special_tokens=False, truncation=True, max_length=keeps_image)
    assert kept["input_ids"][0] == full[-keeps_image:]
    with pytest.raises(ValueError, match="[Tt]runcat"):
        processor(images=image(), text=text, add_special_tokens=False, truncation=True, max_length=keeps_image - 1)


# Chat template


USER_TURN = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}


def test_chat_template_user_turn(processor: SetokimProcessor) -> None:
    assert processor.apply_chat_template([USER_TURN]) == f"USER: {IMAGE_TOKEN}\nWhat is shown? "
    assert processor.apply_chat_template([USER_TURN], add_generation_prompt=True) == (
        f"USER: {IMAGE_TOKEN}\nWhat is shown? ASSISTANT:"
    )


def test_chat_template_conversation(processor: SetokimProcessor) -> None:
    conversation = [
        {"role": "system", "content": "You are a careful assistant."},
        USER_TURN,
        {"role": "assistant", "content": [{"type": "text", "text": "A red car."}]},
        {"role": "user", "content": [{"type": "text", "text": "And here?"}, {"type": "image"}]},
    ]
    assert processor.apply_chat_template(conversation, add_generation_prompt=True) == (
        f"You are a careful assistant. USER: {IMAGE_TOKEN}\nWhat is shown? ASSISTANT: A red car.</s>"
        f"USER: And here?\n{IMAGE_TOKEN} ASSISTANT:"
    )


def test_chat_template_rejects_unknown_roles_and_content(processor: SetokimProcessor) -> None:
    with pytest.raises(Exception, match="roles"):
        processor.apply_chat_template([{"role": "tool", "content": "42"}])
    with pytest.raises(Exception, match="content"):
        processor.apply_chat_template([{"role": "user", "content": [{"type": "video"}]}])


def test_chat_template_tokenizes_with_images(processor: SetokimProcessor) -> None:
    conversation = [{"role": "user", "content": [{"type": "image", "image": image()}, USER_TURN["content"][1]]}]
    inputs = processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    expected = processor(images=image(), text=f"USER: {IMAGE_TOKEN}\nWhat is shown? ASSISTANT:", return_tensors="pt")
    assert torch.equal(inputs["input_ids"], expected["input_ids"])
    assert torch.equal(inputs["pixel_values"], expected["pixel_values"])
    assert (inputs["input_ids"][0] == processor.tokenizer.bos_token_id).sum() == 1


def test_assistant_mask_marks_exactly_the_answers(processor: SetokimProcessor) -> None:
    answers = ["A red car.", "It is parked."]
    conversation = [
        {"role": "user", "content": [{"type": "image", "image": image()}, {"type": "text", "text": "What is shown?"}]},
        {"role": "assistant", "content": answers[0]},
        {"role": "user", "content": "Where?"},
        {"role": "assistant", "content": answers[1]},
    ]
    inputs = processor.apply_chat_template(
        conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt"
    )
    ids, mask = inputs["input_ids"][0].tolist(), inputs["assistant_masks"][0].tolist()
    assert len(image_groups(ids, processor)) == 1 and not any(mask[: ids.index(processor.image_end_token_id) + 1])
    spans, start = [], None
    for position, flag in enumerate([*mask, 0]):
        if flag and start is None:
            start = position
        elif not flag and start is not None:
            spans.append(processor.decode(ids[start:position]))
            start = None
    assert [span.strip() for span in spans] == [answer + "</s>" for answer in answers]
    assert ids[-1] == processor.tokenizer.eos_token_id and mask[-1] == 1


# Serialization


def test_save_load_round_trip(processor: SetokimProcessor, tmp_path: Path) -> None:
    processor.save_pretrained(tmp_path)
    for name in ("processor_config.json", "chat_template.jinja", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).exists(), name
    reloaded = SetokimProcessor.from_pretrained(tmp_path)
    assert type(reloaded.image_processor) is SetokImageProcessor
    assert reloaded.chat_template == processor.chat_template
    assert (reloaded.image_start_token_id, reloaded.image_token_id, reloaded.image_end_token_id) == (
        processor.image_start_token_id,
        processor.image_token_id,
        processor.image_end_token_id,
    )
    prompts = [f"USER: {IMAGE_TOKEN}\nWhat is shown? ASSISTANT:", "USER: hello ASSISTANT:"]
    before = processor(images=[image()], text=prompts, padding=True, return_tensors="pt")
    after = reloaded(images=[image()], text=prompts, padding=True, return_tensors="pt")
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert reloaded.apply_chat_template([USER_TURN]) == processor.apply_chat_template([USER_TURN])
