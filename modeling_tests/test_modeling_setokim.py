"""Setokim: placeholder expansion, loss, generate() with every strategy, batching, round trips, errors.

The forward, loss and batching tests run on three language-model families: Llama and Qwen2 (rotary positions,
which hide a uniform shift of the position ids) and GPT-2 (learned absolute positions, which do not).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import IMAGE_END_ID, IMAGE_START_ID, IMAGE_TOKEN_ID, PAD_ID, randomize_weights, tiny_setokim_config
from conftest import random_pixel_values as images
from torch.nn import functional as F
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import find_labels

from transformers_setok import SetokimConfig, SetokimForConditionalGeneration
from transformers_setok.placeholder_expansion import IGNORE_INDEX, expand_image_placeholders

IMAGE = [IMAGE_START_ID, IMAGE_TOKEN_ID, IMAGE_END_ID]
SPECIAL_IDS = dict(pad_token_id=PAD_ID, bos_token_id=1, eos_token_id=2)
TEXT_CONFIGS = {
    "llama": tiny_setokim_config().text_config.to_dict(),
    "qwen2": dict(
        model_type="qwen2", vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **SPECIAL_IDS,
    ),
    "gpt2": dict(
        model_type="gpt2", vocab_size=120, n_embd=32, n_layer=2, n_head=4, n_positions=512,
        tie_word_embeddings=False, **SPECIAL_IDS,
    ),
}  # fmt: skip


@pytest.fixture(params=sorted(TEXT_CONFIGS))
def any_setokim(request: pytest.FixtureRequest) -> SetokimForConditionalGeneration:
    """A tiny Setokim on each language-model family."""
    torch.manual_seed(0)
    return SetokimForConditionalGeneration(tiny_setokim_config(text_config=TEXT_CONFIGS[request.param])).eval()


def padded(rows: list[list[int]], side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """`input_ids` and `attention_mask` of `rows` padded to one width on `side`."""
    width = max(map(len, rows))

    def pad(row: list[int], fill: int) -> list[int]:
        padding = [fill] * (width - len(row))
        return padding + row if side == "left" else row + padding

    ids = torch.tensor([pad(r, PAD_ID) for r in rows])
    mask = torch.tensor([pad([1] * len(r), 0) for r in rows])
    return ids, mask


def reference_projector(model: SetokimForConditionalGeneration, tokens: torch.Tensor) -> torch.Tensor:
    """The `mlp{N}x_gelu` projector written from its weights: linear maps with exact GELUs between them."""
    linears = [layer for layer in model.model.multi_modal_projector if isinstance(layer, torch.nn.Linear)]
    for index, layer in enumerate(linears):
        tokens = tokens @ layer.weight.T + layer.bias
        if index < len(linears) - 1:
            tokens = 0.5 * tokens * (1 + torch.erf(tokens / 2**0.5))
    return tokens


def row_pixels(pixels: torch.Tensor, at: slice) -> torch.Tensor | None:
    return pixels[at] if at.stop > at.start else None


def reference_logits(
    model: SetokimForConditionalGeneration, row: list[int], pixels: torch.Tensor | None
) -> torch.Tensor:
    """Logits of one unpadded prompt, building its embedding sequence piece by piece.

    Each placeholder becomes its image's SeTok tokens through the projector written out above; the language model
    then runs alone, with its own default positions `0..n-1`.
    """
    setok = model.model.setok(pixels) if pixels is not None else None
    embed = model.get_input_embeddings()
    pieces, image = [], 0
    for token in row:
        if token == IMAGE_TOKEN_ID:
            count = int(setok.num_tokens[image])
            pieces.append(reference_projector(model, setok.tokens[image, :count]))
            image += 1
        else:
            pieces.append(embed.weight[token][None])
    hidden = model.model.language_model(inputs_embeds=torch.cat(pieces)[None]).last_hidden_state
    return hidden[0] @ model.lm_head.weight.T


# three rows of different lengths: one image, two images, none
ROWS = [[1, *IMAGE, 5, 6, 7], [1, 8, *IMAGE, 9, *IMAGE, 10, 11], [1, 12, 13]]
ROW_IMAGES = [slice(0, 1), slice(1, 3), slice(3, 3)]


def test_logits_align_with_a_piecewise_reference(any_setokim: SetokimForConditionalGeneration) -> None:
    pixels = images(3)
    ids, mask = padded(ROWS)
    with torch.no_grad():
        out = any_setokim(input_ids=ids, pixel_values=pixels, attention_mask=mask)
        expected = [reference_logits(any_setokim, row, row_pixels(pixels, at)) for row, at in zip(ROWS, ROW_IMAGES)]
    width = out.logits.shape[1]
    for row, reference in enumerate(expected):
        length = len(reference)
        assert out.attention_mask[row].tolist() == [0] * (width - length) + [1] * length
        torch.testing.assert_close(out.logits[row, -length:], reference, atol=1e-5, rtol=1e-4)


def test_left_padded_rows_equal_each_row_alone(any_setokim: SetokimForConditionalGeneration) -> None:
    """A row's logits depend neither on the padding in front of it nor on the other rows of the batch."""
    pixels = images(3, seed=5)
    ids, mask = padded(ROWS)
    with torch.no_grad():
        batched = any_setokim(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
        for index, (row, at) in enumerate(zip(ROWS, ROW_IMAGES)):
            alone = any_setokim(input_ids=torch.tensor([row]), pixel_values=row_pixels(pixels, at)).logits[0]
            torch.testing.assert_close(batched[index, -len(alone) :], alone, atol=1e-5, rtol=1e-4, msg=f"row {index}")


@pytest.mark.parametrize("side", ["left", "right"])
def test_expansion_keeps_the_padding_side_of_the_input(tiny_setokim, side: str) -> None:
    ids, mask = padded([[1, *IMAGE, 5], [1, *IMAGE, 5, 6]], side=side)  # a single padding token
    same_image = images(1).expand(2, -1, -1, -1)  # so the rows stay one token apart after expansion
    with torch.no_grad():
        expanded = tiny_setokim.model.prepare_multimodal_inputs(ids, same_image, mask).attention_mask
    assert expanded[0, 0 if side == "left" else -1] == 0 and expanded[1].all()


def test_right_padded_rows_stay_right_padded_and_equal_each_row_alone(
    any_setokim: SetokimForConditionalGeneration,
) -> None:
    """Expansion re-pads on the side the input was padded on: a right-padded row starts at position 0."""
    pixels = images(3, seed=7)
    ids, mask = padded(ROWS, side="right")
    assert (mask[:, 0] == 1).all() and (mask == 0).any(), "padded on the right"
    with torch.no_grad():
        out = any_setokim(input_ids=ids, pixel_values=pixels, attention_mask=mask)
        for index, (row, at) in enumerate(zip(ROWS, ROW_IMAGES)):
            alone = any_setokim(input_ids=torch.tensor([row]), pixel_values=row_pixels(pixels, at)).logits[0]
            length = len(alone)
            assert out.attention_mask[index].tolist() == [1] * length + [0] * (out.logits.shape[1] - length)
            torch.testing.assert_close(out.logits[index, :length], alone, atol=1e-5, rtol=1e-4, msg=f"row {index}")


def expanded_targets(row: list[int], num_tokens: list[int]) -> list[int]:
    """The row's ids with each placeholder replaced by its image's count of `-100`s."""
    counts = iter(num_tokens)
    return [t for token in row for t in ([IGNORE_INDEX] * next(counts) if token == IMAGE_TOKEN_ID else [token])]


def test_loss_of_a_left_padded_batch_equals_the_reference(any_setokim: SetokimForConditionalGeneration) -> None:
    pixels = images(3, seed=6)
    ids, mask = padded(ROWS)
    first = mask.cumsum(dim=1) == 1  # a row's first token has nothing before it to predict it
    labels = ids.masked_fill((mask == 0) | first, IGNORE_INDEX)
    with torch.no_grad():
        out = any_setokim(input_ids=ids, pixel_values=pixels, attention_mask=mask, labels=labels)
        num_tokens = any_setokim.model.setok(pixels).num_tokens.tolist()
        logits, targets = [], []
        for row, at in zip(ROWS, ROW_IMAGES):
            logits.append(reference_logits(any_setokim, row, row_pixels(pixels, at))[:-1])
            targets.append(torch.tensor(expanded_targets(row, num_tokens[at])[1:]))
    manual = F.cross_entropy(torch.cat(logits), torch.cat(targets), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.loss, manual, atol=1e-5, rtol=1e-5)


def shifted(labels: torch.Tensor) -> torch.Tensor:
    """What a causal LM's loss makes of labels: each position's target is the next position's label."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def text_labels(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`ids` as labels, `-100` on padding and on each row's first token (nothing before it predicts it)."""
    return ids.masked_fill((mask == 0) | (mask.cumsum(dim=1) == 1), IGNORE_INDEX)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("keep_image_labels", [False, True])
def test_expanded_shift_labels_are_the_expanded_labels_shifted(side: str, keep_image_labels: bool) -> None:
    ids, mask = padded(ROWS, side)
    labels = text_labels(ids, mask)
    expanded = expand_image_placeholders(
        ids == IMAGE_TOKEN_ID,
        mask,
        torch.tensor([3, 1, 4]),
        labels=labels,
        shift_labels=shifted(labels),
        keep_image_labels=keep_image_labels,
    )
    assert torch.equal(expanded.shift_labels, shifted(expanded.labels))


def test_shift_labels_replace_the_shifted_labels_in_the_loss(tiny_setokim: SetokimForConditionalGeneration) -> None:
    """As in every causal LM (sequence-parallel training passes them), the loss follows `shift_labels`."""
    pixels = images(3, seed=6)
    ids, mask = padded(ROWS)
    labels = text_labels(ids, mask)
    inputs = dict(input_ids=ids, pixel_values=pixels, attention_mask=mask)
    to_next_shard = shifted(labels)
    to_next_shard[:, -1] = 9  # a shard's last token has a target too: the next shard's first token
    with torch.no_grad():
        plain = tiny_setokim(**inputs, labels=labels)
        given = tiny_setokim(**inputs, labels=torch.full_like(labels, 7), shift_labels=shifted(labels))
        sharded = tiny_setokim(**inputs, labels=labels, shift_labels=to_next_shard)
    torch.testing.assert_close(given.loss, plain.loss)
    assert torch.equal(given.shift_labels, shifted(plain.labels))
    assert sharded.shift_labels[:, -1].tolist() == [9, 9, 9]
    assert not torch.isclose(sharded.loss, plain.loss)


def test_trainer_finds_labels_alone_as_the_label_argument() -> None:
    """`shift_labels` travel in `**kwargs` as in every causal LM: were it a named argument, `Trainer` would count it
    among the labels and, not finding it in a batch, evaluate without a loss."""
    assert find_labels(SetokimForConditionalGeneration) == ["labels"]


def test_shift_labels_must_align_with_the_callers_ids(tiny_setokim: SetokimForConditionalGeneration) -> None:
    ids = torch.tensor([[1, *IMAGE, 5, 6]])
    expanded_length = torch.zeros(1, 9, dtype=torch.long)
    with pytest.raises(ValueError, match="shift_labels must align with the caller's input_ids, shape \\(1, 6\\)"):
        tiny_setokim(input_ids=ids, pixel_values=images(1), labels=ids, shift_labels=expanded_length)


def test_loss_on_text_targets_only_and_gradients_reach_projector_and_merger(
    tiny_setokim: SetokimForConditionalGeneration,
) -> None:
    tiny_setokim.train()
    ids = torch.tensor([[1, *IMAGE, 5, 6, 7, 2]])
    labels = ids.clone()
    labels[0, :4] = IGNORE_INDEX
    out = tiny_setokim(input_ids=ids, pixel_values=images(1), labels=labels)
    assert torch.isfinite(out.loss)
    count = int(out.image_outputs.num_tokens[0])
    expected_labels = [IGNORE_INDEX] * (3 + count) + [5, 6, 7, 2]
    assert out.labels[0].tolist() == expected_labels
    shifted = out.logits[0, :-1][torch.tensor(expected_labels[1:]) != IGNORE_INDEX]
    manual = torch.nn.functional.cross_entropy(shifted, torch.tensor([5, 6, 7, 2]))
    torch.testing.assert_close(out.loss, manual)
    out.loss.backward()
    for part in (tiny_setokim.model.multi_modal_projector, tiny_setokim.model.setok.merger):
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0


def test_position_ids_count_attended_tokens_from_zero(tiny_setokim: SetokimForConditionalGeneration) -> None:
    """A left-padded row gets the positions `0..n-1` it gets alone, whatever the padding before it."""
    ids, mask = padded(ROWS)
    for padding_side in ("left", "right"):
        with torch.no_grad():
            prepared = tiny_setokim.model.prepare_multimodal_inputs(ids, images(3), mask, padding_side=padding_side)
        for row in range(len(ROWS)):
            assert prepared.attention_mask.dtype == torch.long
            attended = prepared.attention_mask[row].bool()
            assert prepared.position_ids[row, attended].tolist() == list(range(int(attended.sum()))), padding_side


def test_text_only_batch_equals_the_plain_language_model(tiny_setokim: SetokimForConditionalGeneration) -> None:
    config = tiny_setokim.config.text_config
    plain = LlamaForCausalLM(LlamaConfig(**config.to_dict())).eval()
    plain.model.load_state_dict(tiny_setokim.model.language_model.state_dict())
    plain.lm_head.load_state_dict(tiny_setokim.lm_head.state_dict())
    ids, mask = padded([[1, 5, 6, 7], [1, 8, 9, 10, 11, 12]])
    with torch.no_grad():
        ours = tiny_setokim(input_ids=ids, attention_mask=mask, labels=ids)
        theirs = plain(input_ids=ids, attention_mask=mask, labels=ids)
    torch.testing.assert_close(ours.logits, theirs.logits)
    assert ours.image_outputs is None


def greedy(model, ids, mask, pixels, **kwargs) -> torch.Tensor:
    return model.generate(
        input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=6, do_sample=False, **kwargs
    )


def test_batched_left_padded_greedy_equals_each_row_alone(any_setokim: SetokimForConditionalGeneration) -> None:
    rows = [[1, *IMAGE, 5, 6], [1, 9, 9, 8, *IMAGE, 7, 7, 10, 11, 12], [1, *IMAGE, 8, *IMAGE, 9], [1, 5, 6, 7]]
    at = [slice(0, 1), slice(1, 2), slice(2, 4), slice(4, 4)]
    pixels = images(4)
    with torch.no_grad():
        counts = any_setokim.get_image_features(pixels).num_tokens
    assert len(set(counts.tolist())) == 4, "the images give different token counts, so the rows are re-padded"
    ids, mask = padded(rows)
    batched = greedy(any_setokim, ids, mask, pixels)
    assert torch.equal(batched[:, : ids.shape[1]], ids), "sequences start with the caller's input_ids"
    for row, (tokens, images_at) in enumerate(zip(rows, at)):
        row_ids = torch.tensor([tokens])
        alone = greedy(any_setokim, row_ids, torch.ones_like(row_ids), row_pixels(pixels, images_at))
        assert torch.equal(batched[row, ids.shape[1] :], alone[0, row_ids.shape[1] :]), f"row {row}"
        with torch.no_grad():
            reference = reference_logits(any_setokim, tokens, row_pixels(pixels, images_at))
        assert alone[0, row_ids.shape[1]] == reference[-1].argmax(), f"row {row}: the first new token"


def test_cache_and_no_cache_agree(tiny_setokim: SetokimForConditionalGeneration) -> None:
    ids, mask = padded([[1, *IMAGE, 5, 6], [1, 8, *IMAGE, *IMAGE, 9, 10, 11]])
    pixels = images(3, seed=1)
    cached = greedy(tiny_setokim, ids, mask, pixels, use_cache=True)
    uncached = greedy(tiny_setokim, ids, mask, pixels, use_cache=False)
    assert torch.equal(cached, uncached)


def test_beam_search_and_sampling_are_reproducible(tiny_setokim: SetokimForConditionalGeneration) -> None:
    ids, mask = padded([[1, *IMAGE, 5, 6], [1, 8, *IMAGE, 9, 10]])
    pixels = images(2, seed=2)
    beams = [
        tiny_setokim.generate(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=pixels,
            max_new_tokens=5,
            num_beams=3,
            num_return_sequences=2,
        )
        for _ in range(2)
    ]
    assert torch.equal(*beams)
    assert beams[0].shape[0] == 4
    assert torch.equal(beams[0][:, : ids.shape[1]], ids.repeat_interleave(2, dim=0))
    samples = []
    for _ in range(2):
        torch.manual_seed(123)
        samples.append(
            tiny_setokim.generate(
                input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=8, do_sample=True, top_k=50
            )
        )
    assert torch.equal(*samples)


def test_generate_output_dict_starts_with_caller_ids(tiny_setokim: SetokimForConditionalGeneration) -> None:
    ids = torch.tensor([[1, *IMAGE, 5]])
    out = tiny_setokim.generate(
        input_ids=ids,
        pixel_values=images(1),
        max_new_tokens=3,
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=True,
    )
    assert out.sequences.shape == (1, ids.shape[1] + 3)
    assert torch.equal(out.sequences[:, : ids.shape[1]], ids)
    assert len(out.scores) == 3
    assert out.scores[0].argmax(-1).item() == out.sequences[0, ids.shape[1]].item()


def test_save_load_round_trip_gives_identical_logits(tmp_path, tiny_setokim) -> None:
    from transformers import AutoModel, AutoModelForImageTextToText

    from transformers_setok import SetokimModel

    ids = torch.tensor([[1, *IMAGE, 5, 6]])
    pixels = images(1)
    randomize_weights(tiny_setokim, seed=2)  # biases and norms a save that forgot them would re-create differently
    tiny_setokim.save_pretrained(tmp_path)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(reloaded) is SetokimForConditionalGeneration
    base = AutoModel.from_pretrained(tmp_path).eval()
    assert type(base) is SetokimModel
    with torch.no_grad():
        before = tiny_setokim(input_ids=ids, pixel_values=pixels)
        after = reloaded(input_ids=ids, pixel_values=pixels)
        hidden = base(input_ids=ids, pixel_values=pixels).last_hidden_state
    assert torch.equal(before.logits, after.logits)
    assert torch.equal(before.image_outputs.image_embeds, after.image_outputs.image_embeds)
    torch.testing.assert_close(tiny_setokim.lm_head(hidden), before.logits)
    prompt = dict(input_ids=ids, pixel_values=pixels, max_new_tokens=6, do_sample=False)
    assert torch.equal(reloaded.generate(**prompt), tiny_setokim.generate(**prompt))


def test_vision_config_is_the_encoders_and_is_saved_once(tmp_path) -> None:
    """`config.vision_config`, where Transformers looks for it, is the SeTok encoder's, saved only inside SeTok's."""
    config = tiny_setokim_config()
    assert config.vision_config is config.setok_config.vision_config
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "vision_config" not in saved and "vision_config" in saved["setok_config"]
    assert "vision_config" not in config.to_dict()
    reloaded = SetokimConfig.from_pretrained(tmp_path)
    assert reloaded.vision_config is reloaded.setok_config.vision_config
    assert reloaded.vision_config.to_diff_dict() == config.vision_config.to_diff_dict()


def test_forward_returns_the_image_features_and_their_encoder_states_when_asked(tiny_setokim) -> None:
    """`image_outputs` is what `get_image_features` returns, with the vision encoder's hidden states on request."""
    ids, pixels = torch.tensor([[1, *IMAGE, 5, 6]]), images(1)
    with torch.no_grad():
        plain = tiny_setokim(input_ids=ids, pixel_values=pixels)
        asked = tiny_setokim(input_ids=ids, pixel_values=pixels, output_hidden_states=True)
        features = tiny_setokim.get_image_features(pixels, output_hidden_states=True)
    assert plain.image_outputs.hidden_states is None
    assert len(asked.hidden_states) == tiny_setokim.config.text_config.num_hidden_layers + 1
    assert len(asked.image_outputs.hidden_states) == tiny_setokim.config.vision_config.num_hidden_layers + 1
    for name in ("hidden_states", "pooler_output", "last_hidden_state", "token_mask"):
        torch.testing.assert_close(getattr(asked.image_outputs, name), getattr(features, name), msg=name)
    assert plain.image_features is plain.image_outputs  # the former name still answers


def test_tied_embeddings_follow_the_text_config() -> None:
    config = tiny_setokim_config()
    config.text_config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = SetokimForConditionalGeneration(
        tiny_setokim_config(text_config=config.text_config, tie_word_embeddings=True)
    )
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


@pytest.mark.parametrize(
    ("rows", "count", "message"),
    [
        ([[1, 5, 6]], 1, "0 image placeholders"),
        ([[1, *IMAGE, 5]], 2, "2 images"),
        ([[1, *IMAGE, *IMAGE]], 1, "2 image placeholders"),
    ],
)
def test_placeholder_and_image_counts_must_match(tiny_setokim, rows, count: int, message: str) -> None:
    ids = torch.tensor(rows)
    with pytest.raises(ValueError, match=message):
        tiny_setokim(input_ids=ids, pixel_values=images(count))
    with pytest.raises(ValueError, match=message):
        tiny_setokim.generate(input_ids=ids, pixel_values=images(count), max_new_tokens=1)


def test_placeholders_without_images_are_named(tiny_setokim) -> None:
    with pytest.raises(ValueError, match="no pixel_values"):
        tiny_setokim(input_ids=torch.tensor([[1, *IMAGE, 5]]))


def test_pixel_values_of_the_wrong_rank_are_named(tiny_setokim) -> None:
    with pytest.raises(ValueError, match="pixel_values must be"):
        tiny_setokim(input_ids=torch.tensor([[1, *IMAGE, 5]]), pixel_values=torch.zeros(3, 64, 64))


def test_bad_projector_type_is_named() -> None:
    with pytest.raises(Exception, match="projector_type"):
        tiny_setokim_config(projector_type="mlp2x_relu")


@pytest.mark.parametrize(("projector_type", "linears"), [("linear", 1), ("mlp2x_gelu", 2), ("mlp3x_gelu", 3)])
def test_projector_types(projector_type: str, linears: int) -> None:
    model = SetokimForConditionalGeneration(tiny_setokim_config(projector_type=projector_type))
    layers = [m for m in model.model.multi_modal_projector if isinstance(m, torch.nn.Linear)]
    assert len(layers) == linears
    assert layers[0].in_features == 24 and layers[-1].out_features == 32


def test_bfloat16_generate_runs(tiny_setokim: SetokimForConditionalGeneration) -> None:
    model = tiny_setokim.to(torch.bfloat16)
    ids = torch.tensor([[1, *IMAGE, 5, 6]])
    out = model.generate(input_ids=ids, pixel_values=images(1).to(torch.bfloat16), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 4) and torch.equal(out[:, : ids.shape[1]], ids)
