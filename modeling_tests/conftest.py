"""Tiny random configs built in code: no Hub access exists where these tests run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from transformers_setok import (
    SetokConfig,
    SetokImageProcessor,
    SetokimConfig,
    SetokimForConditionalGeneration,
    SetokimProcessor,
    SetokModel,
)
from transformers_setok.tokenizer_training import train_sentencepiece_tokenizer


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


def randomize_weights(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Set every parameter (biases and norms included) to seeded random values; returns `model`.

    A freshly initialised model has zero biases and unit norms, which a checkpoint that forgets them would
    re-create exactly on load; round trips run on these trained-looking weights instead. Parameters that start
    at one (norm scales) stay near one, the rest near zero, so activations keep a sensible scale.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            noise = (
                torch.randn(parameter.shape, generator=generator)
                / max(parameter.shape[-1] if parameter.dim() else 1, 1) ** 0.5
            )
            parameter.copy_((0.5 * noise + (parameter == 1).float()).to(parameter.dtype))
    return model


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


SAMPLE_TEXTS = [
    "USER: What is shown in the image? ASSISTANT: A red car parked on a quiet street.",
    "USER: Describe the picture in detail. ASSISTANT: Two cats sleep on a blue sofa near a window.",
    "USER: How many dogs are there? ASSISTANT: There are 3 dogs playing in the park.",
    "A photo of a mountain lake at sunset, with trees along the shore.",
    "The quick brown fox jumps over the lazy dog.",
    "Segment the person on the left.\nGenerate an image of a small house.",
    "Edit the image: make the sky purple and add 2 birds.",
]


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a byte-fallback BPE Llama tokenizer trained once per session on `SAMPLE_TEXTS`."""
    folder = tmp_path_factory.mktemp("tiny_tokenizer")
    train_sentencepiece_tokenizer(SAMPLE_TEXTS, folder, vocab_size=400)
    return folder


@pytest.fixture
def tiny_processor(tiny_tokenizer_dir: Path) -> SetokimProcessor:
    """The tiny tokenizer (left padding, for generation) with a 64x64 image processor."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir, padding_side="left")
    return SetokimProcessor(SetokImageProcessor(size={"height": 64, "width": 64}), tokenizer)


def setokim_for(processor: SetokimProcessor, **overrides) -> SetokimForConditionalGeneration:
    """A tiny Setokim whose vocabulary and image token ids match `processor`."""
    tokenizer = processor.tokenizer
    config = tiny_setokim_config(
        image_token_id=processor.image_token_id,
        image_start_token_id=processor.image_start_token_id,
        image_end_token_id=processor.image_end_token_id,
        **overrides,
    )
    config.text_config.vocab_size = len(tokenizer)
    config.text_config.pad_token_id = tokenizer.pad_token_id
    config.text_config.bos_token_id = tokenizer.bos_token_id
    config.text_config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(0)
    return SetokimForConditionalGeneration(config).eval()


NO_PLUGIN_PRELUDE = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoPlugin(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] == "transformers_setok":
                raise ImportError("the plugin is not installed here")

    sys.meta_path.insert(0, NoPlugin())
    """
)


def run_without_plugin(script: str, *args: str, workdir: Path) -> str:
    """Run `script` in a fresh Python that cannot import this plugin (as on a machine without it); its stdout."""
    path = workdir / "without_plugin.py"
    path.write_text(NO_PLUGIN_PRELUDE + textwrap.dedent(script))
    env = {**os.environ, "HF_MODULES_CACHE": str(workdir / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(path), *args], capture_output=True, text=True, env=env, cwd=workdir, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def train_briefly(model, collator, examples: list, output_dir: Path, max_steps: int, learning_rate: float) -> None:
    """A short stock-`Trainer` run on `examples` (batches of two, no saving or logging), leaving `model` in eval."""
    from transformers import Trainer, TrainingArguments

    arguments = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        learning_rate=learning_rate,
        per_device_train_batch_size=2,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        seed=0,
        remove_unused_columns=False,  # the collator reads `messages`, `images` and `mask`
    )
    Trainer(model=model, args=arguments, train_dataset=examples * 8, data_collator=collator).train()
    model.eval()


def tiny_causal_lm(tokenizer, num_hidden_layers: int = 1):
    """A seeded 32-wide Llama whose vocabulary and special ids are the tokenizer's, like a causal LM from the Hub."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config).eval()


def random_pixel_values(count: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """`(count, 3, size, size)` seeded normal pixel values, images for the tiny 64x64 encoder."""
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows as a left-padded batch (`PAD_ID`), with its attention mask, as generation expects."""
    width = max(map(len, rows))
    ids = torch.tensor([[PAD_ID] * (width - len(row)) + row for row in rows])
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    return ids, mask
