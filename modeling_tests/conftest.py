"""Tiny random configs built in code: no Hub access exists where these tests run."""

from __future__ import annotations

import pytest
import torch

from transformers_setok import SetokConfig, SetokModel


def tiny_setok_config(**overrides) -> SetokConfig:
    """A SigLIP-style tokenizer small enough for CPU tests: 64x64 images, an 8x8 patch grid."""
    settings = dict(
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=64,
            patch_size=8,
        ),
        num_attention_heads=2,
        intermediate_size=64,
        token_size=24,
        cluster_k=5,
        cluster_threshold=0.3,
    )
    settings.update(overrides)
    return SetokConfig(**settings)


@pytest.fixture
def tiny_setok() -> SetokModel:
    torch.manual_seed(0)
    return SetokModel(tiny_setok_config()).eval()
