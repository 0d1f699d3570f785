"""Prompt-aware token reduction inside Setokim (`visual_token_keep`): what the language model reads, and that
forward, generate, labels, positions and the cache all see the reduced counts.

References here never call `prompt_aware_token_reduction`: the kept tokens are chosen by a plain loop over
images and query tokens, and the reduced sequence is built by hand.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import (
    IMAGE_END_ID,
    IMAGE_START_ID,
    IMAGE_TOKEN_ID,
    PAD_ID,
    left_pad,
    randomize_weights,
    tiny_setok_config,
    tiny_setokim_config,
)
from conftest import random_pixel_values as images
from huggingface_hub.errors import StrictDataclassError

from transformers_setok import SetokimConfig, SetokimForConditionalGeneration

IMAGE = [IMAGE_START_ID, IMAGE_TOKEN_ID, IMAGE_END_ID]
SPECIAL = {IMAGE_TOKEN_ID, IMAGE_START_ID, IMAGE_END_ID, PAD_ID, 1, 2}  # the image tokens, pad, BOS, EOS
# Two rows, left-padded: one image with a question, and two images sharing one question.
ROWS = [[1, *IMAGE, 5, 6, 7], [1, *IMAGE, 8, *IMAGE, 9, 10, 11, 12]]


def reducing_setokim(**overrides) -> SetokimForConditionalGeneration:
    """A tiny Setokim with trained-looking weights whose images become 6 to 9 tokens."""
    config = tiny_setokim_config(setok_config=tiny_setok_config(min_tokens=6, max_tokens=9), **overrides)
    torch.manual_seed(0)
    return randomize_weights(SetokimForConditionalGeneration(config), seed=3).eval()


@pytest.fixture(scope="module")
def model() -> SetokimForConditionalGeneration:
    return reducing_setokim()


def batch() -> dict[str, torch.Tensor]:
    input_ids, attention_mask = left_pad(ROWS)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": images(3, seed=1)}


def reference_kept(model, input_ids, attention_mask, pixel_values, keep: float) -> list[list[int]]:
    """Per image, in a loop: the SeTok indices of the `ceil(keep * n)` tokens whose best cosine similarity to a
    text token of its own row is highest (ties to the lower index), in their original order."""
    with torch.no_grad():
        features = model.get_image_features(pixel_values)
        embeddings = model.get_input_embeddings().weight.detach()
    image_row = [row for row, ids in enumerate(input_ids.tolist()) for token in ids if token == IMAGE_TOKEN_ID]
    kept = []
    for image, row in enumerate(image_row):
        query = [
            embeddings[token]
            for token, attended in zip(input_ids[row].tolist(), attention_mask[row].tolist())
            if attended and token not in SPECIAL
        ]
        count = int(features.num_tokens[image])
        scores = []
        for index in range(count):
            token = features.image_embeds[image, index]
            scores.append(max(float(torch.cosine_similarity(token, text, dim=0)) for text in query))
        order = sorted(range(count), key=lambda index: (-scores[index], index))
        kept.append(sorted(order[: math.ceil(keep * count)]))
    return kept


def reduced_inputs(model, input_ids, attention_mask, pixel_values, kept: list[list[int]]):
    """The left-padded sequence with each placeholder written out as its kept tokens, and their embeddings."""
    with torch.no_grad():
        features = model.get_image_features(pixel_values)
    rows, row_embeds, image = [], [], 0
    for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
        row, embeds = [], []
        for token, attended in zip(ids, mask):
            if not attended:
                continue
            if token == IMAGE_TOKEN_ID:
                row += [IMAGE_TOKEN_ID] * len(kept[image])
                embeds += [features.image_embeds[image, index] for index in kept[image]]
                image += 1
            else:
                row.append(token)
        rows.append(row)
        row_embeds.append(embeds)
    ids, mask = left_pad(rows)
    width = max(map(len, row_embeds))
    image_embeds = torch.stack(
        [torch.stack(embeds + [torch.zeros_like(embeds[0])] * (width - len(embeds))) for embeds in row_embeds]
    )
    return ids, mask, image_embeds


# --- what is kept -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0.5, 0.3])
def test_each_image_keeps_the_tokens_its_own_prompt_matches(model, keep: float) -> None:
    inputs = batch()
    with torch.no_grad():
        out = model(**inputs, visual_token_keep=keep)
    kept = reference_kept(model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], keep)
    features = out.image_outputs
    assert [row[row >= 0].tolist() for row in features.kept_indices] == kept
    assert features.num_tokens.tolist() == [len(indices) for indices in kept]
    before = model.get_image_features(inputs["pixel_values"]).num_tokens
    assert features.num_tokens_before_reduction.tolist() == before.tolist()
    assert bool((features.num_tokens < before).all())


def test_logits_equal_the_reduced_sequence_built_by_hand(model) -> None:
    """Positions and image positions line up: the model on its own reduction equals the language model run on
    the hand-built reduced sequence (ids with `image_embeds` filling the kept image positions)."""
    inputs = batch()
    kept = reference_kept(model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], 0.5)
    ids, mask, image_embeds = reduced_inputs(model, *inputs.values(), kept)
    with torch.no_grad():
        reduced = model(**inputs, visual_token_keep=0.5)
        by_hand = model(input_ids=ids, attention_mask=mask, image_embeds=image_embeds)
    assert reduced.logits.shape == by_hand.logits.shape
    attended = mask.bool()
    torch.testing.assert_close(reduced.logits[attended], by_hand.logits[attended], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("merge", [False, True])
def test_keeping_everything_gives_exactly_todays_logits_and_generations(merge: bool) -> None:
    model = reducing_setokim()
    inputs = batch()
    with torch.no_grad():
        plain = model(**inputs)
        kept_all = model(**inputs, visual_token_keep=1.0, visual_token_merge=merge)
    assert torch.equal(plain.logits, kept_all.logits)
    plain_tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    model.config.visual_token_keep, model.config.visual_token_merge = 1.0, merge
    assert torch.equal(model.generate(**inputs, max_new_tokens=5, do_sample=False), plain_tokens)


@pytest.mark.parametrize("merge", [False, True])
def test_a_batch_with_reduction_equals_its_rows_alone(model, merge: bool) -> None:
    inputs = batch()
    with torch.no_grad():
        together = model(**inputs, visual_token_keep=0.4, visual_token_merge=merge)
    first_images = [images(3, seed=1)[:1], images(3, seed=1)[1:]]
    offsets = together.attention_mask.shape[1] - together.attention_mask.sum(dim=1)
    for row, pixel_values in enumerate(first_images):
        ids, mask = left_pad([ROWS[row]])
        with torch.no_grad():
            alone = model(
                input_ids=ids,
                attention_mask=mask,
                pixel_values=pixel_values,
                visual_token_keep=0.4,
                visual_token_merge=merge,
            )
        torch.testing.assert_close(together.logits[row, int(offsets[row]) :], alone.logits[0], atol=1e-5, rtol=1e-5)


def test_forward_and_generate_keep_the_same_tokens(model) -> None:
    inputs = batch()
    with torch.no_grad():
        forward = model(**inputs, visual_token_keep=0.5)
    generated = model.generate(
        **inputs,
        visual_token_keep=0.5,
        max_new_tokens=3,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    torch.testing.assert_close(generated.logits[0], forward.logits[:, -1], atol=1e-5, rtol=1e-5)
    assert torch.equal(generated.sequences[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


def test_the_config_setting_is_saved_and_a_call_overrides_it(model, tmp_path) -> None:
    inputs = batch()
    with torch.no_grad():
        per_call = model(**inputs, visual_token_keep=0.5)
        model.config.visual_token_keep = 0.5
        try:
            model.save_pretrained(tmp_path)
        finally:
            model.config.visual_token_keep = None
    loaded = SetokimForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.visual_token_keep == 0.5
    with torch.no_grad():
        from_config = loaded(**inputs)
        everything = loaded(**inputs, visual_token_keep=1.0)
        plain = model(**inputs)
    torch.testing.assert_close(from_config.logits, per_call.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(everything.logits, plain.logits, atol=1e-5, rtol=1e-5)


def test_inputs_embeds_find_the_same_query_as_input_ids(model) -> None:
    inputs = batch()
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    with torch.no_grad():
        by_ids = model(**inputs, visual_token_keep=0.5)
        by_embeds = model(
            inputs_embeds=embeds,
            attention_mask=inputs["attention_mask"],
            pixel_values=inputs["pixel_values"],
            visual_token_keep=0.5,
        )
    assert torch.equal(by_ids.image_outputs.kept_indices, by_embeds.image_outputs.kept_indices)
    assert torch.equal(by_embeds.attention_mask, by_ids.attention_mask)
    attended = by_ids.attention_mask.bool()  # padding slots hold the pad embedding, or zeros with inputs_embeds
    torch.testing.assert_close(by_embeds.logits[attended], by_ids.logits[attended], atol=1e-5, rtol=1e-5)


def test_merging_folds_each_dropped_token_into_its_nearest_kept_token(model) -> None:
    inputs = batch()
    with torch.no_grad():
        merged = model(**inputs, visual_token_keep=0.5, visual_token_merge=True).image_outputs
        features = model.get_image_features(inputs["pixel_values"])
    for image in range(3):
        count = int(features.num_tokens[image])
        tokens = features.image_embeds[image, :count]
        kept = merged.kept_indices[image][merged.kept_indices[image] >= 0].tolist()
        groups = {index: [index] for index in kept}
        for index in sorted(set(range(count)) - set(kept)):
            similarity = [float(torch.cosine_similarity(tokens[index], tokens[k], dim=0)) for k in kept]
            groups[kept[similarity.index(max(similarity))]].append(index)
        expected = torch.stack([tokens[groups[index]].mean(dim=0) for index in kept])
        torch.testing.assert_close(merged.image_embeds[image, : len(kept)], expected, atol=1e-5, rtol=1e-5)


# --- training -----------------------------------------------------------------------------------------------


def test_the_answer_is_not_part_of_the_query_and_the_loss_is_on_the_reduced_sequence(model) -> None:
    """Labels mark the answer (12); the query is the prompt alone, so training keeps what generation would, and
    the loss equals the next-token loss computed by hand on the hand-built reduced sequence."""
    inputs = batch()
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -2:] = inputs["input_ids"][:, -2:]  # the last two tokens of each row are its answer
    prompt_mask = inputs["attention_mask"].clone()
    prompt_mask[:, -2:] = 0
    kept = reference_kept(model, inputs["input_ids"], prompt_mask, inputs["pixel_values"], 0.5)
    with torch.no_grad():
        out = model(**inputs, labels=labels, visual_token_keep=0.5)
    assert [row[row >= 0].tolist() for row in out.image_outputs.kept_indices] == kept
    ids, mask, image_embeds = reduced_inputs(model, *inputs.values(), kept)
    expected_labels = torch.full_like(ids, -100)
    expected_labels[:, -2:] = ids[:, -2:]
    assert torch.equal(out.labels, expected_labels)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, image_embeds=image_embeds).logits
    manual = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), expected_labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, manual, atol=1e-5, rtol=1e-5)


def test_gradients_reach_the_kept_tokens_through_the_projector(model) -> None:
    inputs = batch()
    model.zero_grad()
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -1] = inputs["input_ids"][:, -1]
    model(**inputs, labels=labels, visual_token_keep=0.5).loss.backward()
    for parameter in model.model.multi_modal_projector.parameters():
        assert parameter.grad is not None and bool(parameter.grad.abs().sum() > 0)
    model.zero_grad()


# --- bad input -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0.0, 1.5, -0.2, 0])
def test_a_bad_keep_is_refused_naming_it(model, keep) -> None:
    with pytest.raises(ValueError, match="visual_token_keep"):
        model(**batch(), visual_token_keep=keep)
    with pytest.raises(StrictDataclassError, match="visual_token_keep"):
        SetokimConfig(**{**tiny_setokim_config().to_dict(), "visual_token_keep": keep})


def test_settings_that_would_be_ignored_are_refused(model) -> None:
    inputs = batch()
    with pytest.raises(ValueError, match="visual_token_keep.*no pixel_values"):
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], visual_token_keep=0.5)
    with pytest.raises(ValueError, match="pass the prompts"):
        model.get_image_features(inputs["pixel_values"], visual_token_keep=0.5)
    with pytest.raises(ValueError, match="no keep was set"):
        model(**inputs, visual_token_merge=True)


def test_a_prompt_without_text_cannot_query(model) -> None:
    ids, mask = left_pad([[1, *IMAGE, 5], [1, *IMAGE]])
    with pytest.raises(ValueError, match=r"rows \[1\] hold no text"):
        model(input_ids=ids, attention_mask=mask, pixel_values=images(2), visual_token_keep=0.5)


def test_images_the_labels_ask_to_write_are_not_reduced() -> None:
    model = reducing_setokim(vision_output_head=True)
    ids, mask = left_pad([[1, 5, 6, *IMAGE]])
    labels = ids.clone()
    with pytest.raises(ValueError, match="ask it to write images \\[0\\]"):
        model(input_ids=ids, attention_mask=mask, pixel_values=images(1), labels=labels, visual_token_keep=0.5)


def test_a_second_turn_on_the_cache_keeps_what_the_first_turn_chose(model) -> None:
    """Continuing from the first turn's cache, the first image keeps the tokens its first-turn prompt chose (its
    cached positions are reused), the new image those the whole conversation chooses; greedy decoding by hand on
    that sequence gives the same tokens."""
    first_prompt = torch.tensor([[1, 5, *IMAGE, 6, 7]])
    first = model.generate(
        first_prompt, images(1), visual_token_keep=0.5, max_new_tokens=4, do_sample=False, return_dict_in_generate=True
    )
    conversation = torch.cat([first.sequences, torch.tensor([[9, *IMAGE, 10, 11]])], dim=1)
    pixels = torch.cat([images(1), -images(1, seed=1).abs()])
    continued = model.generate(
        input_ids=conversation,
        pixel_values=pixels,
        past_key_values=first.past_key_values,
        visual_token_keep=0.5,
        max_new_tokens=4,
        do_sample=False,
    )
    ones = torch.ones_like(conversation)
    kept = [
        reference_kept(model, first_prompt, torch.ones_like(first_prompt), images(1), 0.5)[0],
        reference_kept(model, conversation, ones, pixels, 0.5)[1],
    ]
    ids, mask, image_embeds = reduced_inputs(model, conversation, ones, pixels, kept)
    for _ in range(4):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, image_embeds=image_embeds).logits[:, -1]
        logits[:, IMAGE_TOKEN_ID] = -float("inf")  # as generation does: text never writes the placeholder
        ids = torch.cat([ids, logits.argmax(dim=-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    assert torch.equal(continued[:, conversation.shape[1] :], ids[:, -4:])
