"""Tiny random configs built in code: no Hub access exists where these tests run."""

from __future__ import annotations

import pytest
import torch

from transformers_setok import SetokConfig, SetokimConfig, SetokimForConditionalGeneration, SetokModel


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


IMAGE_TOKEN_ID, IMAGE_START_ID, IMAGE_END_ID, PAD_ID = 100, 101, 102, 0


def tiny_setokim_config(**overrides) -> SetokimConfig:
    """Setokim on the tiny tokenizer and a 2-layer Llama with a 120-token vocabulary."""
    settings = dict(
        setok_config=tiny_setok_config(),
        text_config=dict(
            model_type="llama",
            vocab_size=120,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            pad_token_id=PAD_ID,
            bos_token_id=1,
            eos_token_id=2,
        ),
        image_token_id=IMAGE_TOKEN_ID,
        image_start_token_id=IMAGE_START_ID,
        image_end_token_id=IMAGE_END_ID,
    )
    settings.update(overrides)
    return SetokimConfig(**settings)


@pytest.fixture
def tiny_setokim() -> SetokimForConditionalGeneration:
    torch.manual_seed(0)
    return SetokimForConditionalGeneration(tiny_setokim_config()).eval()
