"""Fine-tuning: the chat collator, `Trainer` steps, freezing by part, peft LoRA on the LLM, `device_map="auto"`."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize_weights, setokim_for, tiny_setok_config
from peft import PeftModel, get_peft_model
from PIL import Image
from safetensors import safe_open
from transformers import AutoTokenizer, Trainer, TrainingArguments

from transformers_setok import SetokImageProcessor, SetokimForConditionalGeneration, SetokimProcessor
from transformers_setok.placeholder_expansion import IGNORE_INDEX
from transformers_setok.training import (
    SetokimDataCollator,
    count_images,
    language_model_lora_config,
    model_parts,
    set_trainable,
)


@pytest.fixture
def processor(tiny_tokenizer_dir: Path) -> SetokimProcessor:
    """A fresh tokenizer per test, since the processor adds its image tokens to the tokenizer it gets."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    return SetokimProcessor(SetokImageProcessor(size={"height": 64, "width": 64}), tokenizer)


def image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (48, 40, 3), dtype=np.uint8)


def turn(question: str, answer: str, num_images: int = 0) -> list[dict]:
    """A user message (its images first) and the assistant's answer."""
    content = [{"type": "image"}] * num_images + [{"type": "text", "text": question}]
    return [
        {"role": "user", "content": content},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]


EXAMPLES = [
    {"images": [image(0)], "messages": turn("What is shown?", "A red car.", 1)},
    {"images": [], "messages": turn("How many dogs are there?", "3 dogs.")},
    {
        "images": [image(1), image(2)],
        "messages": turn("Compare them.", "Two cats, then a lake.", 2) + turn("Which is bigger?", "The lake."),
    },
    {"messages": turn("Describe the picture.", "A mountain lake at sunset.")},
]


def solid(colour: tuple[int, int, int]) -> np.ndarray:
    return np.full((48, 40, 3), colour, dtype=np.uint8)


# Two pictures, one question, two answers: only a model that reads the image can answer both.
IMAGE_DEPENDENT = [
    {"images": [solid((230, 20, 20))], "messages": turn("What colour is it?", "A red car.", 1)},
    {"images": [solid((20, 20, 230))], "messages": turn("What colour is it?", "A blue sofa.", 1)},
]


def image_dependent_model(processor: SetokimProcessor) -> SetokimForConditionalGeneration:
    """A tiny Setokim giving every image the same token count, so the answer can come from the content alone."""
    model = setokim_for(processor, setok_config=tiny_setok_config(min_tokens=3, max_tokens=3))
    set_trainable(model)
    return model


def label_spans(labels: torch.Tensor) -> list[list[int]]:
    """The runs of labelled (not -100) ids in one row."""
    spans, current = [], []
    for label in [*labels.tolist(), IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            spans.append(current)
            current = []
    return spans


def answers(example: dict) -> list[str]:
    return [message["content"][0]["text"] for message in example["messages"] if message["role"] == "assistant"]


def image_groups_are_whole(ids: list[int], processor: SetokimProcessor) -> bool:
    group = [processor.image_start_token_id, processor.image_token_id, processor.image_end_token_id]
    placeholders = [position for position, token_id in enumerate(ids) if token_id == processor.image_token_id]
    whole = all(ids[position - 1 : position + 2] == group for position in placeholders)
    return whole and ids.count(group[0]) == ids.count(group[2]) == len(placeholders)


def first_question(example: dict, processor: SetokimProcessor) -> dict[str, torch.Tensor]:
    """The generation prompt of an example's first user message, with the images it holds."""
    question = example["messages"][0]
    return processor(
        images=example.get("images", [])[: count_images([question])] or None,
        text=[processor.apply_chat_template([question], add_generation_prompt=True)],
        return_tensors="pt",
    )


# Collator


def test_labels_are_exactly_the_answers(processor: SetokimProcessor) -> None:
    with_system = [{"role": "system", "content": "Be brief."}, *EXAMPLES[2]["messages"]]
    examples = [{"images": EXAMPLES[2]["images"], "messages": with_system}, *EXAMPLES[:2]]
    batch = SetokimDataCollator(processor)(examples)
    eos = processor.tokenizer.eos_token
    for example, ids, labels in zip(examples, batch["input_ids"], batch["labels"]):
        labelled = labels != IGNORE_INDEX
        assert torch.equal(labels[labelled], ids[labelled])
        decoded = [processor.decode(span).strip() for span in label_spans(labels)]
        assert decoded == [answer + eos for answer in answers(example)]
    assert batch["pixel_values"].shape == (3, 3, 64, 64)

    model = setokim_for(processor)
    outputs = model(**batch)
    expanded = outputs.labels
    assert expanded.shape[1] > batch["labels"].shape[1]  # each placeholder became its image's tokens
    assert (expanded != IGNORE_INDEX).sum() == (batch["labels"] != IGNORE_INDEX).sum()
    assert not (expanded[outputs.attention_mask.bool()] == processor.image_token_id).any()
    assert torch.isfinite(outputs.loss)


def test_batch_without_images_has_no_pixel_values(processor: SetokimProcessor) -> None:
    batch = SetokimDataCollator(processor)([EXAMPLES[1], EXAMPLES[3]])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert torch.isfinite(setokim_for(processor)(**batch).loss)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padding(processor: SetokimProcessor, padding_side: str) -> None:
    collator = SetokimDataCollator(processor, padding_side=padding_side)
    batch = collator(EXAMPLES)
    width = batch["input_ids"].shape[1]
    for row, example in enumerate(EXAMPLES):
        alone = collator([example])
        length = alone["input_ids"].shape[1]
        kept = slice(0, length) if padding_side == "right" else slice(width - length, width)
        padding = torch.ones(width, dtype=torch.bool)
        padding[kept] = False
        for key in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(batch[key][row, kept], alone[key][0]), key
        assert (batch["input_ids"][row, padding] == processor.tokenizer.pad_token_id).all()
        assert (batch["attention_mask"][row, padding] == 0).all()
        assert (batch["labels"][row, padding] == IGNORE_INDEX).all()
    assert batch["attention_mask"].sum(dim=1).max() == width
    with pytest.raises(ValueError, match="padding_side"):
        SetokimDataCollator(processor, padding_side="middle")


def test_truncation_drops_whole_turns(processor: SetokimProcessor, caplog: pytest.LogCaptureFixture) -> None:
    messages = turn("What is shown?", "A red car.", 1) + turn("And here?", "Two cats.", 1) + turn("Colour?", "Blue.")
    images = [image(0), image(1)]
    prefixes = [  # the conversation cut after each turn, with the images it keeps
        {"images": images[:1], "messages": messages[:2]},
        {"images": images, "messages": messages[:4]},
        {"images": images, "messages": messages},
    ]
    whole = [SetokimDataCollator(processor)([prefix]) for prefix in prefixes]
    lengths = [batch["input_ids"].shape[1] for batch in whole]
    assert lengths == sorted(lengths)

    for max_length in range(lengths[0], lengths[-1] + 1):
        kept = max(index for index, length in enumerate(lengths) if length <= max_length)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="transformers_setok.training"):
            batch = SetokimDataCollator(processor, max_length=max_length)([{"images": images, "messages": messages}])
        for key in whole[kept]:
            assert torch.equal(batch[key], whole[kept][key]), (max_length, key)
        assert image_groups_are_whole(batch["input_ids"][0].tolist(), processor)
        dropped = len(prefixes) - 1 - kept
        assert (f"Dropped {dropped} trailing turn(s)" in caplog.text) == (dropped > 0), caplog.text


def test_tokenizer_without_a_pad_token_pads_with_eos(processor: SetokimProcessor) -> None:
    processor.tokenizer.pad_token = None
    batch = SetokimDataCollator(processor)(EXAMPLES)
    padding = batch["attention_mask"] == 0
    assert padding.any() and (batch["input_ids"][padding] == processor.tokenizer.eos_token_id).all()


def test_empty_conversation_is_named(processor: SetokimProcessor) -> None:
    with pytest.raises(ValueError, match=r"examples\[1\]: the conversation is empty"):
        SetokimDataCollator(processor)([EXAMPLES[0], {"messages": []}])


def test_image_paths_are_read_from_the_working_directory_by_default(
    processor: SetokimProcessor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Image.fromarray(image(0)).save(tmp_path / "relative.png")
    Image.fromarray(image(1)).save(tmp_path / "absolute.png")
    monkeypatch.chdir(tmp_path)
    messages = turn("Compare them.", "Two cats, then a lake.", 2)
    collator = SetokimDataCollator(processor)
    from_paths = collator([{"images": ["relative.png", tmp_path / "absolute.png"], "messages": messages}])
    from_arrays = collator([{"images": [image(0), image(1)], "messages": messages}])
    torch.testing.assert_close(from_paths["pixel_values"], from_arrays["pixel_values"], atol=1e-6, rtol=0)


def test_max_length_must_be_positive(processor: SetokimProcessor) -> None:
    for max_length in (0, -3):
        message = f"max_length must be a positive number of tokens or None, got {max_length}"
        with pytest.raises(ValueError, match=message):
            SetokimDataCollator(processor, max_length=max_length)
    assert SetokimDataCollator(processor, max_length=1).max_length == 1  # positive, if too short for any turn


def test_truncation_error_when_first_turn_does_not_fit(processor: SetokimProcessor) -> None:
    first_turn = SetokimDataCollator(processor)([EXAMPLES[0]])["input_ids"].shape[1]
    collator = SetokimDataCollator(processor, max_length=first_turn - 1)
    with pytest.raises(ValueError, match=rf"examples\[1\]: its first turn alone is {first_turn} text tokens"):
        collator([{"messages": turn("Hi?", "Hi.")}, EXAMPLES[0]])


def test_images_must_match_image_parts(processor: SetokimProcessor) -> None:
    collator = SetokimDataCollator(processor)
    with pytest.raises(ValueError, match=r"examples\[0\]: `messages` hold 1 image part\(s\) but `images` holds 2"):
        collator([{"images": [image(0), image(1)], "messages": EXAMPLES[0]["messages"]}])
    with pytest.raises(ValueError, match="empty batch"):
        collator([])


# Trainer


def batch_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    model.eval()
    with torch.no_grad():
        return model(**batch).loss.item()


def train(
    model: torch.nn.Module,
    collator: SetokimDataCollator,
    output_dir: Path,
    dataset: list[dict] = EXAMPLES,
    **arguments,
) -> Trainer:
    settings = dict(
        per_device_train_batch_size=2,
        num_train_epochs=15,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=0,
    )
    settings.update(arguments)
    args = TrainingArguments(output_dir=str(output_dir), **settings)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    trainer.train()
    model.eval()
    return trainer


def teacher_forced_answer_is_right(
    model: SetokimForConditionalGeneration, processor: SetokimProcessor, example: dict
) -> bool:
    """Whether every answer token is the model's most likely next token, given the conversation so far."""
    with torch.no_grad():
        out = model(**SetokimDataCollator(processor)([example]))
    predicted, targets = out.logits[0, :-1].argmax(dim=-1), out.labels[0, 1:]
    answered = targets != IGNORE_INDEX
    return bool(answered.any()) and torch.equal(predicted[answered], targets[answered])


@pytest.mark.parametrize("activation_checkpointing", [False, True])
def test_trainer_learns_answers_that_depend_on_the_image(
    processor: SetokimProcessor, tmp_path: Path, activation_checkpointing: bool
) -> None:
    model = image_dependent_model(processor)
    collator = SetokimDataCollator(processor)
    batch = collator(IMAGE_DEPENDENT)
    before = batch_loss(model, batch)
    options = dict(num_train_epochs=30, activation_checkpointing=activation_checkpointing)
    trainer = train(model, collator, tmp_path, IMAGE_DEPENDENT, **options)
    assert model.is_activation_checkpointing == activation_checkpointing
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 30 and logged[-1] < logged[0]
    assert batch_loss(model, batch) < 0.25 * before
    for example in IMAGE_DEPENDENT:
        assert teacher_forced_answer_is_right(model, processor, example), answers(example)


def test_training_teaches_generate_answers_that_depend_on_the_image(
    processor: SetokimProcessor, tmp_path: Path
) -> None:
    model = image_dependent_model(processor)
    dataset = [*IMAGE_DEPENDENT, EXAMPLES[2]]  # and a two-image, two-turn conversation
    train(model, SetokimDataCollator(processor), tmp_path, dataset, num_train_epochs=40, per_device_train_batch_size=3)
    for example in dataset:
        prompt = first_question(example, processor)
        generated = model.generate(**prompt, max_new_tokens=16, do_sample=False)
        reply = processor.decode(generated[0, prompt["input_ids"].shape[1] :])
        assert reply == f" {answers(example)[0]}{processor.tokenizer.eos_token}"


def test_gradients_of_image_dependent_answers_reach_merger_and_projector(processor: SetokimProcessor) -> None:
    model = image_dependent_model(processor)
    batch = SetokimDataCollator(processor)(IMAGE_DEPENDENT)
    model.train()
    model(**batch).loss.backward()
    for part in ("merger", "projector"):
        for index, module in enumerate(model_parts(model)[part]):
            for name, parameter in module.named_parameters():
                assert parameter.grad is not None and parameter.grad.abs().sum() > 0, f"{part}: {index}.{name}"
    assert all(p.grad is None for p in model.model.setok.vision_model.parameters()), "the frozen encoder"


def loss_and_gradients(model: SetokimForConditionalGeneration, batch: dict) -> tuple[torch.Tensor, dict]:
    model.train()
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_activation_checkpointing_gives_the_same_loss_and_gradients(processor: SetokimProcessor) -> None:
    model = setokim_for(processor)
    set_trainable(model, vision_encoder=True)
    batch = SetokimDataCollator(processor)(EXAMPLES)
    loss, gradients = loss_and_gradients(model, batch)
    model.activation_checkpointing_enable()
    checkpointed_loss, checkpointed_gradients = loss_and_gradients(model, batch)
    assert gradients.keys() == checkpointed_gradients.keys()
    assert {name.split(".")[2] for name in gradients if name.startswith("model.setok.")} == {"vision_model", "merger"}
    torch.testing.assert_close(checkpointed_loss, loss, rtol=0, atol=1e-6)
    for name, gradient in gradients.items():
        torch.testing.assert_close(checkpointed_gradients[name], gradient, rtol=1e-5, atol=1e-7, msg=name)


def part_weights(model: SetokimForConditionalGeneration) -> dict[str, dict[str, torch.Tensor]]:
    """A copy of every weight, by part, named `{module index}.{parameter name}`."""
    return {
        part: {
            f"{index}.{name}": p.detach().clone()
            for index, module in enumerate(modules)
            for name, p in module.named_parameters()
        }
        for part, modules in model_parts(model).items()
    }


def part_size(model: torch.nn.Module, part: str) -> int:
    return sum(p.numel() for module in model_parts(model)[part] for p in module.parameters())


PARTS = ("vision_encoder", "merger", "projector", "language_model")
# every part enabled alone and disabled alone, so no two flags are ever tested only together
ONE_PART_AT_A_TIME = [{part: part == alone for part in PARTS} for alone in PARTS] + [
    {part: part != alone for part in PARTS} for alone in PARTS
]


def flags_id(flags: dict[str, bool]) -> str:
    enabled = [part for part, on in flags.items() if on]
    return f"only-{enabled[0]}" if len(enabled) == 1 else "all-but-" + next(p for p, on in flags.items() if not on)


@pytest.mark.parametrize("flags", ONE_PART_AT_A_TIME, ids=flags_id)
def test_set_trainable_freezes_what_it_says(processor: SetokimProcessor, tmp_path: Path, flags: dict) -> None:
    model = setokim_for(processor)
    counts = set_trainable(model, **flags)
    for part, modules in model_parts(model).items():
        parameters = {id(p): p for module in modules for p in module.parameters()}.values()
        assert counts[part] == (sum(p.numel() for p in parameters) if flags[part] else 0), part
        assert all(p.requires_grad == flags[part] for p in parameters), part

    before = part_weights(model)
    train(model, SetokimDataCollator(processor), tmp_path, max_steps=1, per_device_train_batch_size=4)
    after = part_weights(model)
    # SeTok reads the second-to-last encoder layer: the last one, the post-norm and the head get no gradient.
    unused = ("0.encoder.layers.1.", "0.post_layernorm.", "0.head.")
    for part, weights in before.items():
        changed = {name for name, weight in weights.items() if not torch.equal(weight, after[part][name])}
        used = {name for name in weights if part != "vision_encoder" or not name.startswith(unused)}
        assert changed == (used if flags[part] else set()), part


# peft LoRA

LORA_WEIGHT = re.compile(
    r"base_model\.model\.model\.language_model\.layers\.\d+\.self_attn\.[qkvo]_proj\.lora_[AB]\.default\.weight"
)


def trainable_names(model: torch.nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def test_lora_on_the_language_model(processor: SetokimProcessor, tmp_path: Path) -> None:
    base = randomize_weights(setokim_for(processor), seed=1)  # a save that forgot biases or norms would show
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, language_model_lora_config())
    lora = trainable_names(model)
    assert len(lora) == 2 * 4 * 2 and all(LORA_WEIGHT.fullmatch(name) for name in lora)  # layers x q,k,v,o x A,B
    lora_size = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert set_trainable(model) == {  # the LLM trains through its adapters only; the merger and projector in full
        "vision_encoder": 0,
        "merger": part_size(model, "merger"),
        "projector": part_size(model, "projector"),
        "language_model": lora_size,
    }
    set_trainable(model, merger=False, projector=False)
    assert trainable_names(model) == lora

    collator = SetokimDataCollator(processor)
    batch = collator(EXAMPLES)
    model.eval()
    with torch.no_grad():
        initial = model(**batch).logits
    train(model, collator, tmp_path / "run", num_train_epochs=3)
    with torch.no_grad():
        logits = model(**batch).logits
    assert not torch.allclose(logits, initial, atol=1e-3)

    model.save_pretrained(tmp_path / "adapter")
    files = {path.name for path in (tmp_path / "adapter").iterdir()}
    assert (
        {"adapter_config.json", "adapter_model.safetensors"}
        <= files
        <= {
            "adapter_config.json",
            "adapter_model.safetensors",
            "README.md",
        }
    )
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as saved:
        assert all("lora_" in key for key in saved.keys())
        assert sum(saved.get_tensor(key).numel() for key in saved.keys()) == lora_size

    fresh_base = SetokimForConditionalGeneration.from_pretrained(tmp_path / "base")
    reloaded = PeftModel.from_pretrained(fresh_base, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(**batch).logits, logits)
        merged = reloaded.merge_and_unload()
        assert type(merged) is SetokimForConditionalGeneration
        torch.testing.assert_close(merged(**batch).logits, logits, rtol=0, atol=1e-5)

    prompt = first_question(EXAMPLES[0], processor)
    generated = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    # The caller's unexpanded ids come back first: peft routed the call through Setokim's own generate.
    assert torch.equal(generated[:, : prompt["input_ids"].shape[1]], prompt["input_ids"])
    assert torch.equal(generated, merged.generate(**prompt, max_new_tokens=5, do_sample=False))


def test_lora_config_passes_its_settings(processor: SetokimProcessor) -> None:
    default = language_model_lora_config()
    assert (default.r, default.lora_alpha, default.lora_dropout, default.task_type) == (8, 16, 0.0, "CAUSAL_LM")
    custom = language_model_lora_config(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=("q_proj",), bias="all")
    assert (custom.r, custom.lora_alpha, custom.lora_dropout, custom.bias) == (4, 8, 0.1, "all")
    assert custom.target_modules == r"model\.language_model\..*\.(q_proj)"
    assert type(get_peft_model(setokim_for(processor), default)).__name__ == "PeftModelForCausalLM"


def test_lora_with_a_trained_projector_copy(processor: SetokimProcessor) -> None:
    config = language_model_lora_config(modules_to_save=["multi_modal_projector"])
    model = get_peft_model(setokim_for(processor), config)
    copies = [name for name in trainable_names(model) if not LORA_WEIGHT.fullmatch(name)]
    assert copies and all(".multi_modal_projector.modules_to_save.default." in name for name in copies)
    counts = set_trainable(model)  # the projector trains through its copy, its original stays frozen
    assert counts["projector"] == sum(p.numel() for name, p in model.named_parameters() if name in copies)
    assert counts["projector"] * 2 == part_size(model, "projector")
    with pytest.raises(TypeError, match="SetokimForConditionalGeneration or a PeftModel of one, got SetokimModel"):
        set_trainable(model.get_base_model().model)


# accelerate


@pytest.mark.parametrize("offload", [False, True])
def test_device_map_auto_loads_like_a_normal_load(processor: SetokimProcessor, tmp_path: Path, offload: bool) -> None:
    randomize_weights(setokim_for(processor), seed=2).save_pretrained(tmp_path / "model")
    batch = SetokimDataCollator(processor)(EXAMPLES)
    plain = SetokimForConditionalGeneration.from_pretrained(tmp_path / "model")
    # With one device there is nothing to dispatch; a memory cap spills the later parts to disk, behind hooks.
    limits = dict(max_memory={"cpu": "200KB"}, offload_folder=tmp_path / "offload") if offload else {}
    dispatched = SetokimForConditionalGeneration.from_pretrained(tmp_path / "model", device_map="auto", **limits)
    if offload:
        assert set(dispatched.hf_device_map.values()) == {"cpu", "disk"}
        assert dispatched.hf_device_map["model.language_model"] == "disk"
    else:
        assert {p.device.type for p in dispatched.parameters()} == {"cpu"}
    with torch.no_grad():
        assert torch.equal(dispatched(**batch).logits, plain(**batch).logits)
    prompt = first_question(EXAMPLES[0], processor)
    expected = plain.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert torch.equal(dispatched.generate(**prompt, max_new_tokens=4, do_sample=False), expected)
