"""Where a new user gets hurt, the model says what to do: context budget, stray arguments, raw pixels, other image
sizes, swapped parts, base-model loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import (
    IMAGE_END_ID,
    IMAGE_START_ID,
    IMAGE_TOKEN_ID,
    randomize_weights,
    tiny_causal_lm,
    tiny_setok_config,
)
from conftest import random_pixel_values as images
from conftest import tiny_setokim_config as setokim_config
from PIL import Image
from transformers import AutoModel, AutoTokenizer, SiglipVisionConfig, SiglipVisionModel
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from transformers_setok import SetokimForConditionalGeneration, SetokimModel, SetokModel
from transformers_setok.modeling_setokim import DEFAULT_MAX_TOKENS

IMAGE = [IMAGE_START_ID, IMAGE_TOKEN_ID, IMAGE_END_ID]


def tiny_setokim(**overrides) -> SetokimForConditionalGeneration:
    torch.manual_seed(0)
    return SetokimForConditionalGeneration(setokim_config(**overrides)).eval()


def test_context_overflow_is_refused_before_the_language_model_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    config = setokim_config(setok_config=tiny_setok_config(min_tokens=20, max_tokens=20))
    config.text_config.max_position_embeddings = 40
    model = SetokimForConditionalGeneration(config).eval()

    def must_not_run(*args, **kwargs):
        raise AssertionError("the language model ran on an input longer than its context")

    monkeypatch.setattr(model.model.language_model, "forward", must_not_run)
    ids = torch.tensor([[1, *IMAGE, 5, *IMAGE, 6]])  # 7 text positions + 2 x 20 image positions = 47 > 40
    for call in (model, model.generate):
        with pytest.raises(ValueError) as error:
            call(input_ids=ids, pixel_values=images(2))
        message = str(error.value)
        assert "47 positions" in message and "40 (max_position_embeddings)" in message
        assert "[20, 20] tokens" in message and "max_tokens (now 20)" in message


def test_input_that_fits_the_context_runs() -> None:
    config = setokim_config(setok_config=tiny_setok_config(min_tokens=20, max_tokens=20))
    config.text_config.max_position_embeddings = 47
    model = SetokimForConditionalGeneration(config).eval()
    out = model(input_ids=torch.tensor([[1, *IMAGE, 5, *IMAGE, 6]]), pixel_values=images(2))
    assert out.logits.shape[1] == 47


def test_unknown_keyword_arguments_point_to_the_processor() -> None:
    model = tiny_setokim()
    image = Image.new("RGB", (64, 64))
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['images'\].*processor\(images="):
        model(input_ids=torch.tensor([[1, *IMAGE]]), images=[image])
    with pytest.raises(TypeError, match=r"\['imgs'\]"):
        model.model(input_ids=torch.tensor([[1, 5]]), imgs=[image])


def test_unnormalised_pixels_get_a_warning_and_normalised_ones_none() -> None:
    model = tiny_setokim()
    logger = logging.get_logger("transformers_setok.modeling_setok")
    raw = torch.randint(0, 256, (1, 3, 64, 64)).float()
    with CaptureLogger(logger) as captured:
        model(input_ids=torch.tensor([[1, *IMAGE]]), pixel_values=raw)
    assert "look unnormalised" in captured.out and "image processor" in captured.out
    with CaptureLogger(logger) as captured:
        model(input_ids=torch.tensor([[1, *IMAGE]]), pixel_values=images(1).clamp(-1, 1))
    assert captured.out == ""


def test_images_of_another_size_are_tokenized_at_their_own_resolution() -> None:
    torch.manual_seed(0)
    setok = randomize_weights(SetokModel(tiny_setok_config()).eval())
    large = images(2, size=128)
    with torch.no_grad():
        out = setok(large)
        reference = setok.vision_model(pixel_values=large, output_hidden_states=True, interpolate_pos_encoding=True)
    assert out.grid_size == (16, 16)
    assert out.assignment.shape == (2, 256)
    torch.testing.assert_close(out.patch_features, reference.hidden_states[-2])
    native = setok(images(2))
    assert native.grid_size == (8, 8)

    model = tiny_setokim()
    logits = model(input_ids=torch.tensor([[1, *IMAGE, 5]]), pixel_values=images(1, size=96)).logits
    features = model.get_image_features(images(1, size=96))
    assert logits.shape[1] == 4 + int(features.num_tokens[0])


def test_pixel_sizes_that_are_not_whole_patches_are_refused() -> None:
    torch.manual_seed(0)
    setok = SetokModel(tiny_setok_config()).eval()
    with pytest.raises(ValueError, match=r"pixel_values of size \(60, 64\) do not split into 8x8 patches"):
        setok(torch.randn(1, 3, 60, 64))


def tiny_siglip() -> SiglipVisionModel:
    torch.manual_seed(0)
    config = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=8
    )
    return SiglipVisionModel(config).eval()


def test_from_parts_names_what_each_argument_must_be(tiny_tokenizer_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    llm, vision = tiny_causal_lm(tokenizer), tiny_siglip()
    with pytest.raises(ValueError, match=r"language_model must be a causal language model.*look swapped"):
        SetokimForConditionalGeneration.from_parts(llm, vision, tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"vision must be a SeTok tokenizer or a vision encoder, got the causal"):
        SetokimForConditionalGeneration.from_parts(llm, llm, tokenizer=tokenizer)


def test_from_parts_gives_a_fresh_tokenizer_a_token_budget(tiny_tokenizer_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    model, _ = SetokimForConditionalGeneration.from_parts(
        tiny_siglip(), tiny_causal_lm(tokenizer), tokenizer=tokenizer
    )
    assert model.config.setok_config.max_tokens == DEFAULT_MAX_TOKENS == 64
    with torch.no_grad():
        counts = model.get_image_features(images(1), cluster_threshold=0.0).num_tokens
    assert counts.tolist() == [64]  # every one of the 64 patches passes a zero threshold; the budget holds there
    chosen, _ = SetokimForConditionalGeneration.from_parts(
        tiny_siglip(), tiny_causal_lm(tokenizer), tokenizer=tokenizer, max_tokens=8
    )
    assert chosen.config.setok_config.max_tokens == 8


def test_a_whole_setokim_folder_loads_as_its_base_model_without_key_reports(tmp_path: Path) -> None:
    model = randomize_weights(tiny_setokim())
    model.save_pretrained(tmp_path)
    base, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(base, SetokimModel)
    assert info["unexpected_keys"] == set() or info["unexpected_keys"] == []
    assert not info["missing_keys"] and not info["mismatched_keys"]
    ids = torch.tensor([[1, *IMAGE, 5]])
    with torch.no_grad():
        torch.testing.assert_close(
            base(input_ids=ids, pixel_values=images(1)).last_hidden_state,
            model.model(input_ids=ids, pixel_values=images(1)).last_hidden_state,
        )
