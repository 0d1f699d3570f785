"""Setokim draws and edits: the vision-token loop, its stopping, teacher forcing, rendering, round trips, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import (
    IMAGE_END_ID,
    IMAGE_START_ID,
    IMAGE_TOKEN_ID,
    PAD_ID,
    left_pad,
    randomize_weights,
    run_without_plugin,
    setokim_for,
    tiny_setok_config,
    tiny_setokim_config,
    train_briefly,
)
from conftest import random_pixel_values as images
from peft import PeftModel, get_peft_model
from PIL import Image
from pretraining_fixtures import tiny_detokenizer_config
from torch import nn
from transformers import AutoModelForImageTextToText

from transformers_setok import (
    SetokimDataCollator,
    SetokimForConditionalGeneration,
    language_model_lora_config,
    set_trainable,
)
from transformers_setok.training import model_parts

IMAGE = [IMAGE_START_ID, IMAGE_TOKEN_ID, IMAGE_END_ID]


def drawing_model(detokenizer: bool = True, **overrides) -> SetokimForConditionalGeneration:
    config = tiny_setokim_config(
        vision_output_head=True, detokenizer_config=tiny_detokenizer_config() if detokenizer else None, **overrides
    )
    torch.manual_seed(0)
    return randomize_weights(SetokimForConditionalGeneration(config).eval(), seed=3)


class StopAfter(nn.Module):
    """An LM head that asks for another vision token until row r has written `counts[r]` of them.

    The loop asks it once after each vision token it writes, so its call count is the tokens written so far;
    `None` never stops.
    """

    def __init__(self, head: nn.Linear, counts: list[int | None]) -> None:
        super().__init__()
        self.head, self.counts, self.calls = head, counts, 0

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden).clone()
        self.calls += 1
        for row, count in enumerate(self.counts):
            close = count is not None and self.calls >= count
            logits[row, ..., IMAGE_END_ID if close else IMAGE_TOKEN_ID] = 1e4
        return logits


def write(model: SetokimForConditionalGeneration, rows: list[list[int]], counts: list[int | None], **kwargs):
    model.lm_head = StopAfter(model.get_output_embeddings(), counts)
    ids, mask = left_pad(rows)
    return model.generate_images(ids, attention_mask=mask, render=False, max_image_tokens=6, **kwargs)


PROMPTS = [[1, 5, 6, 7], [1, 8], [1, 9, 10, 11, 12, 13]]


def test_each_row_stops_where_its_lm_head_closes_the_image_and_equals_itself_alone() -> None:
    model = drawing_model(detokenizer=False)
    counts = [2, None, 4]  # the middle row never closes: it stops at max_image_tokens
    head = model.get_output_embeddings()
    batch = write(model, PROMPTS, counts)
    assert batch.num_tokens.tolist() == [2, 6, 4]
    assert batch.token_mask.sum(dim=1).tolist() == [2, 6, 4]
    for row, (prompt, count) in enumerate(zip(PROMPTS, counts)):
        model.lm_head = head
        alone = write(model, [prompt], [count])
        written = int(alone.num_tokens[0])
        assert written == int(batch.num_tokens[row])
        torch.testing.assert_close(batch.tokens[row, :written], alone.tokens[0], atol=1e-5, rtol=1e-5)
        assert float(batch.tokens[row, written:].abs().sum()) == 0.0
        expected = [*prompt, IMAGE_START_ID, *[IMAGE_TOKEN_ID] * written, IMAGE_END_ID]
        assert batch.sequences[row, : len(expected)].tolist() == expected
        assert set(batch.sequences[row, len(expected) :].tolist()) <= {PAD_ID}


def reference_vision_tokens(model: SetokimForConditionalGeneration, prompt: list[int], steps: int) -> torch.Tensor:
    """Emu2's structure: re-run the whole prefix (prompt, then every token so far) for each new vision token."""
    embed = model.get_input_embeddings()
    sequence = embed(torch.tensor([[*prompt, IMAGE_START_ID]]))
    tokens = []
    for _ in range(steps):
        hidden = model.model.language_model(inputs_embeds=sequence).last_hidden_state[:, -1]
        token = model.vision_head(hidden)
        tokens.append(token[0])
        sequence = torch.cat([sequence, model.model.multi_modal_projector(token)[:, None]], dim=1)
    return torch.stack(tokens)


def test_cached_loop_equals_the_uncached_reference_loop() -> None:
    model = drawing_model(detokenizer=False)
    head = model.get_output_embeddings()
    written = write(model, PROMPTS, [None, None, None])
    model.lm_head = head
    with torch.no_grad():
        for row, prompt in enumerate(PROMPTS):
            reference = reference_vision_tokens(model, prompt, 6)
            torch.testing.assert_close(written.tokens[row], reference, atol=1e-5, rtol=1e-5)


def test_editing_reads_the_prompts_image() -> None:
    model = drawing_model(detokenizer=False)
    prompt = [[1, *IMAGE, 5, 6]]
    first = write(model, prompt, [3], pixel_values=images(1, seed=0))
    second = write(model, prompt, [3], pixel_values=images(1, seed=1))
    assert first.num_tokens.tolist() == second.num_tokens.tolist() == [3]
    assert not torch.allclose(first.tokens, second.tokens)


def training_example(target_pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """`USER: draw` then an answer holding the image to write: labels mark that image and the text after it."""
    ids = torch.tensor([[1, 5, 6, *IMAGE, 2]])
    labels = torch.tensor([[-100, -100, -100, IMAGE_START_ID, IMAGE_TOKEN_ID, IMAGE_END_ID, 2]])
    return dict(input_ids=ids, labels=labels, pixel_values=target_pixels)


def test_teacher_forced_regression_loss_equals_a_manual_computation() -> None:
    model = drawing_model(detokenizer=False)
    example = training_example(images(1))
    output = model(**example)
    with torch.no_grad():
        target = model.model.setok(example["pixel_values"])
    count = int(target.num_tokens[0])
    assert output.labels[0, 4 : 4 + count].tolist() == [IMAGE_TOKEN_ID] * count  # another token follows each one
    assert int(output.labels[0, 4 + count]) == IMAGE_END_ID  # and [/Img] closes the image
    base = model.model(**{k: v for k, v in example.items() if k != "labels"})
    hidden = base.last_hidden_state[0, 3 : 3 + count]  # [Img] predicts the first token, each token the next
    predicted = model.vision_head(hidden)
    expected_tokens = target.tokens[0, :count]
    mse = ((predicted - expected_tokens) ** 2).mean()
    cosine = (predicted * expected_tokens).sum(-1) / (predicted.norm(dim=-1) * expected_tokens.norm(dim=-1))
    manual = 1.0 * mse + 1.0 * (1 - cosine.mean())
    torch.testing.assert_close(output.image_regression_loss, manual, atol=1e-5, rtol=1e-5)
    text_only = nn.functional.cross_entropy(output.logits[0, :-1], output.labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(output.loss, text_only + manual, atol=1e-5, rtol=1e-5)
    output.loss.backward()
    assert model.vision_head[-1].weight.grad.abs().sum() > 0
    assert model.model.multi_modal_projector[0].weight.grad.abs().sum() > 0


def test_an_understanding_model_never_counts_images_in_the_loss() -> None:
    torch.manual_seed(0)
    model = SetokimForConditionalGeneration(tiny_setokim_config()).eval()
    output = model(**training_example(images(1)))
    assert output.image_regression_loss is None
    assert set(output.labels[0, 4:-2].tolist()) == {-100}


def test_generated_images_survive_save_and_load(tmp_path: Path) -> None:
    model = drawing_model()
    ids, mask = left_pad(PROMPTS[:2])
    settings = dict(max_image_tokens=3, num_inference_steps=2, output_type="pt")
    before = model.generate_images(ids, attention_mask=mask, generator=torch.Generator().manual_seed(0), **settings)
    assert before.images.shape == (2, 3, 8, 8)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded.detokenizer, type(model.detokenizer))
    after = reloaded.generate_images(ids, attention_mask=mask, generator=torch.Generator().manual_seed(0), **settings)
    assert torch.equal(after.num_tokens, before.num_tokens)
    torch.testing.assert_close(after.images, before.images)
    again = model.generate_images(ids, attention_mask=mask, generator=torch.Generator().manual_seed(0), **settings)
    torch.testing.assert_close(again.images, before.images)

    script = f"""
    import torch
    from transformers import AutoModelForImageTextToText
    model = AutoModelForImageTextToText.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
    out = model.generate_images(torch.tensor({ids.tolist()}), attention_mask=torch.tensor({mask.tolist()}),
                                generator=torch.Generator().manual_seed(0), max_image_tokens=3,
                                num_inference_steps=2, output_type="pt")
    torch.save(out.images, "images.pt")
    """
    run_without_plugin(script, workdir=tmp_path)
    torch.testing.assert_close(torch.load(tmp_path / "images.pt", weights_only=True), before.images)


def test_bad_input_gets_clear_errors() -> None:
    torch.manual_seed(0)
    understanding = SetokimForConditionalGeneration(tiny_setokim_config()).eval()
    ids = torch.tensor([[1, 5]])
    with pytest.raises(ValueError, match="no vision output head"):
        understanding.generate_images(ids)
    tokens_only = drawing_model(detokenizer=False)
    with pytest.raises(ValueError, match="no detokenizer.*render=False"):
        tokens_only.generate_images(ids)
    with pytest.raises(ValueError, match="max_image_tokens must be a positive int, got 0"):
        tokens_only.generate_images(ids, max_image_tokens=0, render=False)
    with pytest.raises(ValueError, match="holds 1 image placeholders .* but 2 images"):
        tokens_only.generate_images(torch.tensor([[1, *IMAGE, 5]]), pixel_values=images(2), render=False)


def test_trainer_learns_to_draw_each_prompts_image_with_its_token_count(tiny_processor, tmp_path: Path) -> None:
    model = setokim_for(
        tiny_processor, vision_output_head=True, setok_config=tiny_setok_config(cluster_threshold=0.5, max_tokens=6)
    )
    flat = Image.new("RGB", (64, 64), (220, 30, 30))
    busy = Image.fromarray((torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy())
    pixel_values = tiny_processor.image_processor([flat, busy], return_tensors="pt").pixel_values
    with torch.no_grad():
        target_counts = model.model.setok(pixel_values).num_tokens.tolist()
    assert target_counts[0] < target_counts[1]  # the flat image needs fewer tokens than the busy one

    prompts = ["Draw a red square.", "Draw the quick brown fox."]
    examples = [
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": prompt}]},
                {"role": "assistant", "content": [{"type": "image"}]},
            ],
            "images": [image],
        }
        for prompt, image in zip(prompts, [flat, busy])
    ]
    set_trainable(model, merger=False)  # the tokenizer that makes the targets stays fixed, as in the paper
    collator = SetokimDataCollator(tiny_processor)
    with torch.no_grad():
        before = model(**collator(examples)).image_regression_loss.item()
    train_briefly(model, collator, examples, tmp_path, max_steps=80, learning_rate=3e-3)
    with torch.no_grad():
        after = model(**collator(examples)).image_regression_loss.item()
    assert after < 0.5 * before

    chats = [[{"role": "user", "content": [{"type": "text", "text": prompt}]}] for prompt in prompts]
    inputs = tiny_processor.apply_chat_template(
        chats,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"padding": True},
    )
    drawn = model.generate_images(
        inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        max_new_tokens=3,
        max_image_tokens=10,
        render=False,
    )
    assert drawn.num_tokens.tolist() == target_counts


@pytest.mark.parametrize("alone", ["vision_head", "detokenizer", "projector"])
def test_set_trainable_covers_the_generation_heads_one_at_a_time(alone: str) -> None:
    model = drawing_model()
    parts = model_parts(model)
    assert {"vision_head", "detokenizer"} <= set(parts) and "mask_decoder" not in parts  # only the heads it has
    flags = {part: part == alone for part in parts}
    counts = set_trainable(model, **flags)
    for part, modules in parts.items():
        assert all(p.requires_grad == flags[part] for module in modules for p in module.parameters()), part
        assert (counts[part] > 0) == flags[part], part
    assert set_trainable(model)["detokenizer"] == 0  # stage 1 trains it; by default it stays as it is


def test_lora_trains_the_language_model_and_a_saved_copy_of_the_vision_head(tmp_path: Path) -> None:
    model = get_peft_model(
        drawing_model(detokenizer=False), language_model_lora_config(modules_to_save=["vision_head"])
    )
    counts = set_trainable(model, merger=False, projector=False)  # what the adapter folder saves, and only that
    assert counts["vision_head"] > 0 and counts["language_model"] > 0
    example = training_example(images(1))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = model(**example).image_regression_loss.item()
    for _ in range(3):
        optimizer.zero_grad()
        model(**example).loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        trained = model(**example).image_regression_loss.item()
    assert trained < before
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(drawing_model(detokenizer=False), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**example).image_regression_loss.item(), trained, atol=1e-5, rtol=1e-5)
