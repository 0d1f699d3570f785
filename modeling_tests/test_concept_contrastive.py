"""The concept-level contrastive loss against a plain per-image, per-phrase loop, and the phrase embedding."""

from __future__ import annotations

import math

import torch
from pretraining_fixtures import tiny_text_config
from transformers import AutoConfig

from transformers_setok import SetokConceptHead, concept_contrastive_loss

DIM = 6


def reference_loss(tokens: list[torch.Tensor], phrases: list[torch.Tensor], logit_scale: float) -> torch.Tensor:
    """The objective spelled out: `tokens[i]` is image i's (n_i, dim) tokens, `phrases[i]` its (m_i, dim) phrases."""

    def similarity(phrase: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        cosines = [torch.dot(phrase, token) / (phrase.norm() * token.norm()) for token in image_tokens]
        return math.exp(logit_scale) * max(cosines)

    everything = [(owner, phrase) for owner, image_phrases in enumerate(phrases) for phrase in image_phrases]
    phrase_terms = []
    for owner, phrase in everything:
        logits = torch.stack([similarity(phrase, image_tokens) for image_tokens in tokens])
        phrase_terms.append(-(logits[owner] - torch.logsumexp(logits, dim=0)))
    image_terms = []
    for image, image_tokens in enumerate(tokens):
        logits = torch.stack([similarity(phrase, image_tokens) for _, phrase in everything])
        positives = [index for index, (owner, _) in enumerate(everything) if owner == image]
        if positives:
            log_probs = logits - torch.logsumexp(logits, dim=0)
            image_terms.append(-sum(log_probs[index] for index in positives) / len(positives))
    return (torch.stack(phrase_terms).mean() + torch.stack(image_terms).mean()) / 2


def padded(sets: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad variable-length sets with large garbage (which the masks must hide)."""
    length = max(len(item) for item in sets)
    values = 1e3 * torch.ones(len(sets), length, DIM)
    mask = torch.zeros(len(sets), length, dtype=torch.bool)
    for index, item in enumerate(sets):
        values[index, : len(item)], mask[index, : len(item)] = item, True
    return values, mask


def test_loss_equals_the_per_image_per_phrase_reference() -> None:
    generator = torch.Generator().manual_seed(0)
    tokens = [torch.randn(count, DIM, generator=generator) for count in (3, 1, 5, 2)]
    phrases = [torch.randn(count, DIM, generator=generator) for count in (2, 1, 3, 0)]  # the last has none
    logit_scale = torch.tensor(1.3)
    loss = concept_contrastive_loss(*padded(tokens), *padded(phrases), logit_scale)
    torch.testing.assert_close(loss, reference_loss(tokens, phrases, 1.3), atol=1e-5, rtol=1e-5)


def test_temperature_is_learnable_and_capped() -> None:
    generator = torch.Generator().manual_seed(1)
    tokens = [torch.randn(2, DIM, generator=generator) for _ in range(3)]
    phrases = [torch.randn(1, DIM, generator=generator) for _ in range(3)]
    logit_scale = torch.tensor(0.5, requires_grad=True)
    concept_contrastive_loss(*padded(tokens), *padded(phrases), logit_scale).backward()
    assert logit_scale.grad is not None and logit_scale.grad.abs() > 0
    capped = concept_contrastive_loss(*padded(tokens), *padded(phrases), torch.tensor(10.0))
    torch.testing.assert_close(capped, reference_loss(tokens, phrases, math.log(100.0)), atol=1e-4, rtol=1e-5)


def test_a_batch_without_phrases_gives_zero_with_gradients() -> None:
    tokens = torch.randn(2, 3, DIM, requires_grad=True)
    loss = concept_contrastive_loss(
        tokens,
        torch.ones(2, 3, dtype=torch.bool),
        torch.zeros(2, 1, DIM),
        torch.zeros(2, 1, dtype=torch.bool),
        torch.tensor(1.0),
    )
    loss.backward()
    assert loss.item() == 0.0 and tokens.grad is not None


def test_phrases_are_embedded_alone_and_padding_phrases_are_skipped() -> None:
    torch.manual_seed(0)
    head = SetokConceptHead(AutoConfig.for_model(**tiny_text_config()), 24, 2.0, freeze_text_model=True).eval()
    ids = torch.tensor([[[1, 5, 2, 0], [1, 6, 7, 2]], [[1, 8, 2, 0], [0, 0, 0, 0]]])
    phrases, mask = head.embed_phrases(ids, (ids != 0).long())
    assert mask.tolist() == [[True, True], [True, False]]
    assert torch.equal(phrases[1, 1], torch.zeros(24))
    alone_ids = torch.tensor([[1, 6, 7, 2]])
    alone = head.projection(
        head.text_model(input_ids=alone_ids, attention_mask=torch.ones_like(alone_ids)).pooler_output
    )
    torch.testing.assert_close(phrases[0, 1], alone[0], atol=1e-6, rtol=0)
    assert not any(parameter.requires_grad for parameter in head.text_model.parameters())
    assert head.projection.weight.requires_grad and head.logit_scale.requires_grad
