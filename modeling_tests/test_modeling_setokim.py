"""Setokim: placeholder expansion, loss, generate() with every strategy, batching, round trips, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import IMAGE_END_ID, IMAGE_START_ID, IMAGE_TOKEN_ID, PAD_ID, tiny_setokim_config
from transformers import LlamaConfig, LlamaForCausalLM

from transformers_setok import SetokimForConditionalGeneration
from transformers_setok.placeholder_expansion import IGNORE_INDEX

IMAGE = [IMAGE_START_ID, IMAGE_TOKEN_ID, IMAGE_END_ID]


def images(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[PAD_ID] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def reference_logits(model: SetokimForConditionalGeneration, row: list[int], pixels: torch.Tensor) -> torch.Tensor:
    """Logits of one unpadded prompt, building its embedding sequence piece by piece."""
    features = model.get_image_features(pixels)
    embed = model.get_input_embeddings()
    pieces, image = [], 0
    for token in row:
        if token == IMAGE_TOKEN_ID:
            count = int(features.num_tokens[image])
            pieces.append(features.image_embeds[image, :count])
            image += 1
        else:
            pieces.append(embed(torch.tensor([token])))
    hidden = model.model.language_model(inputs_embeds=torch.cat(pieces)[None]).last_hidden_state
    return model.lm_head(hidden)[0]


def test_logits_align_with_a_piecewise_reference(tiny_setokim: SetokimForConditionalGeneration) -> None:
    rows = [[1, *IMAGE, 5, 6, 7], [1, 8, *IMAGE, 9, *IMAGE, 10, 11]]
    pixels = images(3)
    ids, mask = left_pad(rows)
    with torch.no_grad():
        out = tiny_setokim(input_ids=ids, pixel_values=pixels, attention_mask=mask)
        expected = [
            reference_logits(tiny_setokim, rows[0], pixels[:1]),
            reference_logits(tiny_setokim, rows[1], pixels[1:]),
        ]
    for row, reference in enumerate(expected):
        length = len(reference)
        assert int(out.attention_mask[row].sum()) == length
        torch.testing.assert_close(out.logits[row, -length:], reference, atol=1e-5, rtol=1e-4)


def test_loss_on_text_targets_only_and_gradients_reach_projector_and_merger(
    tiny_setokim: SetokimForConditionalGeneration,
) -> None:
    tiny_setokim.train()
    ids = torch.tensor([[1, *IMAGE, 5, 6, 7, 2]])
    labels = ids.clone()
    labels[0, :4] = IGNORE_INDEX
    out = tiny_setokim(input_ids=ids, pixel_values=images(1), labels=labels)
    assert torch.isfinite(out.loss)
    count = int(out.image_features.num_tokens[0])
    expected_labels = [IGNORE_INDEX] * (3 + count) + [5, 6, 7, 2]
    assert out.labels[0].tolist() == expected_labels
    shifted = out.logits[0, :-1][torch.tensor(expected_labels[1:]) != IGNORE_INDEX]
    manual = torch.nn.functional.cross_entropy(shifted, torch.tensor([5, 6, 7, 2]))
    torch.testing.assert_close(out.loss, manual)
    out.loss.backward()
    for part in (tiny_setokim.model.multi_modal_projector, tiny_setokim.model.setok.merger):
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0


def test_text_only_batch_equals_the_plain_language_model(tiny_setokim: SetokimForConditionalGeneration) -> None:
    config = tiny_setokim.config.text_config
    plain = LlamaForCausalLM(LlamaConfig(**config.to_dict())).eval()
    plain.model.load_state_dict(tiny_setokim.model.language_model.state_dict())
    plain.lm_head.load_state_dict(tiny_setokim.lm_head.state_dict())
    ids, mask = left_pad([[1, 5, 6, 7], [1, 8, 9, 10, 11, 12]])
    with torch.no_grad():
        ours = tiny_setokim(input_ids=ids, attention_mask=mask, labels=ids)
        theirs = plain(input_ids=ids, attention_mask=mask, labels=ids)
    torch.testing.assert_close(ours.logits, theirs.logits)
    assert ours.image_features is None


def greedy(model, ids, mask, pixels, **kwargs) -> torch.Tensor:
    return model.generate(
        input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=6, do_sample=False, **kwargs
    )


def test_batched_left_padded_greedy_equals_alone(tiny_setokim: SetokimForConditionalGeneration) -> None:
    short = [1, *IMAGE, 5, 6]
    longer = [1, 9, 9, 8, *IMAGE, 7, 7, 10, 11, 12]
    pixels = images(2)
    alone_ids = torch.tensor([short])
    alone = greedy(tiny_setokim, alone_ids, torch.ones_like(alone_ids), pixels[:1])
    ids, mask = left_pad([short, longer])
    batched = greedy(tiny_setokim, ids, mask, pixels)
    with torch.no_grad():
        counts = tiny_setokim.get_image_features(pixels).num_tokens
    assert counts[0] != counts[1], "the two images give different token counts"
    assert torch.equal(batched[:, : ids.shape[1]], ids), "sequences start with the caller's input_ids"
    assert torch.equal(batched[0, ids.shape[1] :], alone[0, alone_ids.shape[1] :])


def test_rows_without_images_and_several_images_per_prompt(tiny_setokim: SetokimForConditionalGeneration) -> None:
    rows = [[1, 5, 6, 7], [1, *IMAGE, 8, *IMAGE, 9], [1, *IMAGE, 10]]
    pixels = images(3, seed=4)
    ids, mask = left_pad(rows)
    batched = greedy(tiny_setokim, ids, mask, pixels)
    starts = [0, 0, 2]
    for row, (tokens, first) in enumerate(zip(rows, starts)):
        row_ids = torch.tensor([tokens])
        count = sum(t == IMAGE_TOKEN_ID for t in tokens)
        alone = greedy(
            tiny_setokim, row_ids, torch.ones_like(row_ids), pixels[first : first + count] if count else None
        )
        assert torch.equal(batched[row, ids.shape[1] :], alone[0, row_ids.shape[1] :])


def test_cache_and_no_cache_agree(tiny_setokim: SetokimForConditionalGeneration) -> None:
    ids, mask = left_pad([[1, *IMAGE, 5, 6], [1, 8, *IMAGE, *IMAGE, 9, 10, 11]])
    pixels = images(3, seed=1)
    cached = greedy(tiny_setokim, ids, mask, pixels, use_cache=True)
    uncached = greedy(tiny_setokim, ids, mask, pixels, use_cache=False)
    assert torch.equal(cached, uncached)


def test_beam_search_and_sampling_are_reproducible(tiny_setokim: SetokimForConditionalGeneration) -> None:
    ids, mask = left_pad([[1, *IMAGE, 5, 6], [1, 8, *IMAGE, 9, 10]])
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
    torch.testing.assert_close(tiny_setokim.lm_head(hidden), before.logits)


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
