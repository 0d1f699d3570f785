"""Official stage-1 keys outside the tokenizer: detokenizer and losses reported as not mapped, with the reason;
the contrastive temperature maps onto `SetokForPreTraining`."""

from __future__ import annotations

import math

import torch
from pretraining_fixtures import tiny_pretraining_config

from transformers_setok import SetokForPreTraining
from transformers_setok.conversion.convert_setok_official import KeyMapper, official_pretraining_weights

OFFICIAL_STAGE1_EXTRAS = {
    "detokenizer.mapper_fc_in.weight": torch.randn(16, 24),
    "rec_loss.discriminator.main.0.weight": torch.randn(8, 3, 4, 4),
    "contrastive_loss.text_encoder.proj.weight": torch.randn(8, 8),
    "contrastive_loss.logit_scale": torch.tensor(math.log(1 / 0.05)),
}


def test_detokenizer_and_losses_are_not_mapped_with_the_reason_and_the_temperature_is_accounted_for() -> None:
    mapper = KeyMapper(OFFICIAL_STAGE1_EXTRAS, progress=False)
    mapper.classify_leftovers()
    report = mapper.report
    assert set(report.not_mapped) == set(OFFICIAL_STAGE1_EXTRAS) - {"contrastive_loss.logit_scale"}
    assert all("no working architecture to map onto" in reason for reason in report.not_mapped.values())
    assert "concept_head.logit_scale" in report.dropped["contrastive_loss.logit_scale"]
    assert report.unexpected == []
    assert "no working architecture to map onto" in report.format()


def test_the_official_temperature_loads_into_the_concept_head() -> None:
    torch.manual_seed(0)
    model = SetokForPreTraining(tiny_pretraining_config())
    weights = official_pretraining_weights(OFFICIAL_STAGE1_EXTRAS)
    assert list(weights) == ["concept_head.logit_scale"]
    result = model.load_state_dict(weights, strict=False)
    assert result.unexpected_keys == []
    assert torch.equal(
        model.concept_head.logit_scale, OFFICIAL_STAGE1_EXTRAS["contrastive_loss.logit_scale"].reshape(1)
    )
    assert official_pretraining_weights({"tokenizer.out.weight": torch.ones(1)}) == {}
