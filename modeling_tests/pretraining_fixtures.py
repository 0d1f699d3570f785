"""Tiny detokenizer and pretraining configs, and a learnable toy dataset, shared by the stage-1 tests."""

from __future__ import annotations

import torch
from conftest import tiny_setok_config

from transformers_setok import SetokDetokenizerConfig, SetokForPreTrainingConfig

TOKEN_SIZE = 24  # the tiny tokenizer's token_size
COLOURS = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0), "white": (1.0, 1.0, 1.0)}
SHAPES = ("square", "bar")


def tiny_unet_config(**overrides) -> dict:
    """A two-level pixel-space `UNet2DConditionModel` for 8x8 images (diffusers' own test sizes)."""
    settings = dict(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=[8, 16],
        layers_per_block=1,
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        cross_attention_dim=8,
        attention_head_dim=4,
        norm_num_groups=2,
    )
    settings.update(overrides)
    return settings


# A token canvas of 2 channels over a 4-channel coordinate code: the tiny U-Net reads 3 + 4 + 2 channels.
CANVAS_SETTINGS = dict(unet_config=tiny_unet_config(in_channels=9), coordinate_channels=4, canvas_channels=2)


def tiny_detokenizer_config(**overrides) -> SetokDetokenizerConfig:
    settings = dict(
        token_size=TOKEN_SIZE,
        unet_config=tiny_unet_config(),
        scheduler_config=dict(num_train_timesteps=100),
        num_null_tokens=2,
    )
    settings.update(overrides)
    return SetokDetokenizerConfig(**settings)


def tiny_text_config(vocab_size: int = 64) -> dict:
    """A 2-layer CLIP text tower (its pooled output is the EOS state)."""
    return dict(
        model_type="clip_text_model",
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def tiny_pretraining_config(**overrides) -> SetokForPreTrainingConfig:
    settings = dict(
        setok_config=tiny_setok_config(),
        detokenizer_config=tiny_detokenizer_config(),
        text_config=tiny_text_config(),
    )
    settings.update(overrides)
    return SetokForPreTrainingConfig(**settings)


def toy_scene(colour: str, shape: str, size: int = 64) -> torch.Tensor:
    """A `(3, size, size)` image in `[-1, 1]`: a coloured square or bar on grey."""
    image = torch.zeros(3, size, size)
    rows, cols = (
        (slice(size // 4, 3 * size // 4),) * 2
        if shape == "square"
        else (slice(0, size), slice(size // 3, 2 * size // 3))
    )
    image[:, rows, cols] = torch.tensor(COLOURS[colour])[:, None, None]
    return image


def phrase_ids(words: list[str], length: int = 4) -> torch.Tensor:
    """Word-level ids for the tiny text tower: BOS, one id per known word, EOS (id 2), padding 0."""
    vocabulary = {word: index + 3 for index, word in enumerate([*COLOURS, *SHAPES])}
    ids = [1, *(vocabulary[word] for word in words), 2]
    return torch.tensor(ids + [0] * (length - len(ids)))


def toy_examples(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Eight scenes (4 colours x 2 shapes), each with its phrases "<colour>", "<shape>" and, for squares,
    "<colour> <shape>" (so images have 2 or 3 phrases), and its own fixed diffusion noise and timestep."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for colour in COLOURS:
        for shape in SHAPES:
            phrases = [[colour], [shape]] + ([[colour, shape]] if shape == "square" else [])
            ids = torch.zeros(3, 4, dtype=torch.long)
            ids[: len(phrases)] = torch.stack([phrase_ids(words) for words in phrases])
            examples.append(
                dict(
                    pixel_values=toy_scene(colour, shape),
                    concept_input_ids=ids,
                    concept_attention_mask=(ids != 0).long(),
                    noise=torch.randn(3, 8, 8, generator=generator),
                    timesteps=torch.randint(0, 100, (), generator=generator),
                )
            )
    return examples


def reference_canvas_shares(conditioner, hidden: torch.Tensor, mask: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """`(batch, tokens, height, width)`, pixel by pixel and image by image: the softmax over the image's real
    tokens of query . key / sqrt(dim), zero for padding (the token canvas's shares, written out)."""
    first, second = [layer for layer in conditioner.canvas_query if isinstance(layer, torch.nn.Linear)]
    key_layer = conditioner.canvas_key
    shares = torch.zeros(len(hidden), hidden.shape[1], *code.shape[1:])
    for b in range(len(hidden)):
        keys = hidden[b][mask[b]] @ key_layer.weight.T + key_layer.bias
        for y in range(code.shape[1]):
            for x in range(code.shape[2]):
                query = torch.nn.functional.gelu(code[:, y, x] @ first.weight.T + first.bias) @ second.weight.T
                logits = keys @ (query + second.bias) / keys.shape[-1] ** 0.5
                shares[b, mask[b], y, x] = torch.softmax(logits, dim=0)
    return shares
