"""Prompt-aware token reduction against a plain per-image loop, with ties, padding and images sharing a prompt."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from transformers_setok import TokenReductionOutput, prompt_aware_token_reduction


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(a @ b / (a.norm() * b.norm()))


def reference_reduction(image_embeds, token_mask, text_embeds, text_mask, keep, merge_dropped, image_rows):
    """One image at a time: (kept token indices, kept embeddings) per image, by the TRSM definition."""
    results = []
    for image, row in enumerate(image_rows):
        indices = [t for t in range(image_embeds.shape[1]) if token_mask[image, t]]
        queries = [text_embeds[row, s] for s in range(text_embeds.shape[1]) if text_mask[row, s]]
        scores = {t: max(cosine(image_embeds[image, t], query) for query in queries) for t in indices}
        if isinstance(keep, int):
            count = min(keep, len(indices))
        else:
            count = max(1, math.ceil(Fraction(str(keep)) * len(indices)))
        chosen = sorted(sorted(indices, key=lambda t: (-scores[t], t))[:count])
        groups = {t: [t] for t in chosen}
        if merge_dropped:
            for t in indices:
                if t not in groups:
                    nearest = max(chosen, key=lambda c: (cosine(image_embeds[image, t], image_embeds[image, c]), -c))
                    groups[nearest].append(t)
        embeds = [torch.stack([image_embeds[image, m] for m in groups[t]]).mean(dim=0) for t in chosen]
        results.append((chosen, embeds))
    return results


def assert_matches_reference(image_embeds, token_mask, text_embeds, text_mask, keep, merge_dropped, image_rows):
    out = prompt_aware_token_reduction(
        image_embeds,
        token_mask,
        text_embeds,
        text_mask,
        keep=keep,
        merge_dropped=merge_dropped,
        image_rows=torch.tensor(image_rows),
    )
    expected = reference_reduction(image_embeds, token_mask, text_embeds, text_mask, keep, merge_dropped, image_rows)
    assert isinstance(out, TokenReductionOutput)
    counts = [len(chosen) for chosen, _ in expected]
    assert out.num_tokens_before.tolist() == token_mask.sum(dim=1).tolist()
    assert out.num_tokens_after.tolist() == counts
    assert out.image_embeds.shape[1] == max(counts)
    for image, (chosen, embeds) in enumerate(expected):
        count = len(chosen)
        assert out.kept_indices[image].tolist() == chosen + [-1] * (max(counts) - count)
        assert out.token_mask[image].tolist() == [True] * count + [False] * (max(counts) - count)
        torch.testing.assert_close(out.image_embeds[image, :count], torch.stack(embeds))
        assert torch.all(out.image_embeds[image, count:] == 0)
    return out


def scattered_batch(seed: int = 0):
    """Five images over three prompts (rows 0 and 2 hold two images each), padding in tokens and text.

    Padding slots hold copies of the query text, so a reduction that reads them scores them highest; text
    padding holds copies of image tokens, so reading it changes the scores.
    """
    generator = torch.Generator().manual_seed(seed)
    image_embeds = torch.randn(5, 9, 6, generator=generator)
    token_mask = torch.ones(5, 9, dtype=torch.bool)
    token_mask[1, 4:] = False
    token_mask[3, 2:] = False
    token_mask[4, 3] = False  # a hole, not only trailing padding
    text_embeds = torch.randn(3, 5, 6, generator=generator)
    text_mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [1, 0, 1, 0, 1]], dtype=torch.bool)
    image_embeds[~token_mask] = text_embeds[0, 0] * 10
    text_embeds[~text_mask] = image_embeds[0, 0]
    return image_embeds, token_mask, text_embeds, text_mask, [0, 0, 1, 2, 2]


@pytest.mark.parametrize("keep", [0.6, 0.3, 0.01, 1.0, 0.7, 1, 3, 100])
@pytest.mark.parametrize("merge_dropped", [False, True])
def test_matches_a_per_image_loop_with_padding_and_shared_prompts(keep, merge_dropped) -> None:
    assert_matches_reference(*scattered_batch()[:4], keep, merge_dropped, scattered_batch()[4])


def test_ties_keep_the_lower_index_and_merge_into_the_lower_index() -> None:
    image_embeds = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(1))
    image_embeds[0, 4] = image_embeds[0, 1]  # equal scores: 1 before 4
    image_embeds[0, 5] = image_embeds[0, 1] * 2  # same direction, same cosine: a three-way tie
    image_embeds[1] = image_embeds[1, 0]  # every token the same: the first ones win
    text_embeds = torch.cat([image_embeds[0, 1:2], image_embeds[1, :1]])[:, None, :]
    text_mask = torch.ones(2, 1, dtype=torch.bool)
    token_mask = torch.ones(2, 6, dtype=torch.bool)
    for keep in (1, 2, 3, 4):
        out = assert_matches_reference(image_embeds, token_mask, text_embeds, text_mask, keep, True, [0, 1])
        assert out.kept_indices[1, :keep].tolist() == list(range(keep))
    out = prompt_aware_token_reduction(image_embeds, token_mask, text_embeds, text_mask, keep=2)
    assert out.kept_indices[0].tolist() == [1, 4]
    # past 16 elements an unstable sort reorders equal values
    equal = torch.ones(1, 64, 4)
    out = prompt_aware_token_reduction(equal, torch.ones(1, 64), torch.ones(1, 1, 4), torch.ones(1, 1), keep=0.5)
    assert out.kept_indices.tolist() == [list(range(32))]


def test_fractions_round_up_without_float_noise_and_keep_at_least_one() -> None:
    image_embeds, text_embeds = torch.randn(4, 50, 4), torch.randn(4, 2, 4)
    token_mask = torch.arange(50) < torch.tensor([50, 10, 3, 1])[:, None]
    text_mask = torch.ones(4, 2, dtype=torch.bool)
    counts = {
        keep: prompt_aware_token_reduction(
            image_embeds, token_mask, text_embeds, text_mask, keep=keep
        ).num_tokens_after.tolist()
        for keep in (0.14, 0.7, 0.6, 0.34, 1e-12)
    }
    # 50 * 0.14 is 7.000000000000001 in floating point
    assert counts == {
        0.14: [7, 2, 1, 1],
        0.7: [35, 7, 3, 1],
        0.6: [30, 6, 2, 1],
        0.34: [17, 4, 2, 1],
        1e-12: [1, 1, 1, 1],
    }


@pytest.mark.parametrize("merge_dropped", [False, True])
def test_keeping_everything_is_the_identity(merge_dropped) -> None:
    image_embeds, token_mask, text_embeds, text_mask, rows = scattered_batch()
    token_mask[4, 3] = True  # trailing padding only, as SeTok pads
    image_embeds = image_embeds * token_mask[..., None]
    out = prompt_aware_token_reduction(
        image_embeds, token_mask, text_embeds, text_mask, 1.0, merge_dropped, image_rows=torch.tensor(rows)
    )
    assert torch.equal(out.image_embeds, image_embeds)
    assert torch.equal(out.token_mask, token_mask)
    assert torch.equal(out.num_tokens_after, out.num_tokens_before)
    assert torch.equal(out.kept_indices, torch.arange(9).expand(5, 9).masked_fill(~token_mask, -1))


def test_one_image_per_row_by_default_and_gradients_reach_the_kept_tokens() -> None:
    image_embeds, token_mask, text_embeds, text_mask, _ = scattered_batch()
    image_embeds = image_embeds[:3].requires_grad_()
    out = prompt_aware_token_reduction(image_embeds, token_mask[:3], text_embeds, text_mask, keep=2)
    rows = prompt_aware_token_reduction(
        image_embeds, token_mask[:3], text_embeds, text_mask, keep=2, image_rows=torch.arange(3)
    )
    assert torch.equal(out.kept_indices, rows.kept_indices)
    out.image_embeds.sum().backward()
    kept = torch.zeros(3, 9, dtype=torch.bool).scatter(1, out.kept_indices, True)
    assert torch.equal(image_embeds.grad.abs().sum(dim=-1) > 0, kept)


@pytest.mark.parametrize(
    ("keep", "error", "message"),
    [
        (0.0, ValueError, r"keep as a fraction must be in \(0, 1\], got 0.0"),
        (1.5, ValueError, r"keep as a fraction must be in \(0, 1\], got 1.5"),
        (-0.2, ValueError, r"keep as a fraction must be in \(0, 1\]"),
        (float("nan"), ValueError, r"keep as a fraction must be in \(0, 1\]"),
        (0, ValueError, "keep as a token count must be >= 1, got 0"),
        (-3, ValueError, "keep as a token count must be >= 1"),
        (True, TypeError, "keep must be a float fraction in .* or an int count"),
        ("0.5", TypeError, "keep must be a float fraction"),
    ],
)
def test_bad_keep_is_refused_naming_it(keep, error, message) -> None:
    image_embeds, token_mask, text_embeds, text_mask, _ = scattered_batch()
    with pytest.raises(error, match=message):
        prompt_aware_token_reduction(image_embeds[:3], token_mask[:3], text_embeds, text_mask, keep=keep)


def test_inconsistent_inputs_are_refused_naming_the_argument() -> None:
    image_embeds, token_mask, text_embeds, text_mask, rows = scattered_batch()
    rows = torch.tensor(rows)

    def reduce(**changes):
        arguments = dict(
            image_embeds=image_embeds, token_mask=token_mask, text_embeds=text_embeds, text_mask=text_mask
        )
        return prompt_aware_token_reduction(**{**arguments, "image_rows": rows, **changes})

    with pytest.raises(ValueError, match=r"image_embeds must be \(num_images, max_tokens, width\)"):
        reduce(image_embeds=image_embeds[0])
    with pytest.raises(ValueError, match=r"image_embeds holds no image"):
        reduce(image_embeds=image_embeds[:0], token_mask=token_mask[:0], image_rows=rows[:0])
    with pytest.raises(ValueError, match=r"token_mask must be \(5, 9\)"):
        reduce(token_mask=token_mask[:, :8])
    with pytest.raises(ValueError, match=r"text_embeds must be \(batch, seq_len, 6\)"):
        reduce(text_embeds=text_embeds[..., :5])
    with pytest.raises(ValueError, match=r"text_mask must be \(3, 5\)"):
        reduce(text_mask=text_mask[:2])
    with pytest.raises(ValueError, match="image_rows is needed to map 5 images onto 3 text rows"):
        reduce(image_rows=None)
    with pytest.raises(ValueError, match=r"image_rows must be an integer tensor of shape \(5,\)"):
        reduce(image_rows=rows[:4])
    with pytest.raises(ValueError, match=r"image_rows must index the 3 rows of text_embeds, got \[0, 0, 1, 2, 3\]"):
        reduce(image_rows=torch.tensor([0, 0, 1, 2, 3]))
    empty_text = text_mask.clone()
    empty_text[2] = False
    with pytest.raises(ValueError, match=r"text_mask selects no query token for images \[3, 4\]"):
        reduce(text_mask=empty_text)
    empty_image = token_mask.clone()
    empty_image[1] = False
    with pytest.raises(ValueError, match=r"token_mask holds no token for images \[1\]"):
        reduce(token_mask=empty_image)
