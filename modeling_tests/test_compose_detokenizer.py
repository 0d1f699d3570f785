"""A composed Setokim that draws: `compose_setokim(..., detokenizer=FOLDER)` adds a vision head and the detokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import randomize_weights, tiny_causal_lm, tiny_setok_config
from pretraining_fixtures import tiny_detokenizer_config
from transformers import AutoModelForImageTextToText, AutoTokenizer

from transformers_setok import SetokDetokenizer, SetokModel
from transformers_setok.conversion import compose_setokim


@pytest.fixture
def parts(tiny_tokenizer_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    SetokModel(tiny_setok_config()).save_pretrained(tmp_path / "setok")
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    llm = tiny_causal_lm(tokenizer)
    llm.save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    return tmp_path / "setok", tmp_path / "llm"


def test_compose_with_a_detokenizer_folder_draws_and_reloads(parts: tuple[Path, Path], tmp_path: Path) -> None:
    torch.manual_seed(0)
    detokenizer = randomize_weights(SetokDetokenizer(tiny_detokenizer_config()), seed=2)
    detokenizer.save_pretrained(tmp_path / "detokenizer")
    model, processor = compose_setokim(*parts, tmp_path / "out", detokenizer=tmp_path / "detokenizer")
    assert model.config.vision_output_head and model.vision_head is not None
    for name, value in detokenizer.state_dict().items():
        assert torch.equal(model.detokenizer.state_dict()[name], value), name

    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "out").eval()
    inputs = processor(text=["USER: Draw a red square. ASSISTANT:"], return_tensors="pt")
    settings = dict(max_image_tokens=2, num_inference_steps=2, output_type="pt")
    drawn = reloaded.generate_images(**inputs, generator=torch.Generator().manual_seed(0), **settings)
    expected = model.eval().generate_images(**inputs, generator=torch.Generator().manual_seed(0), **settings)
    torch.testing.assert_close(drawn.images, expected.images)
    assert drawn.images.shape == (1, 3, 8, 8)


def test_compose_refuses_a_folder_that_holds_no_detokenizer(parts: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="holds a 'setok' model; pass a SeTok detokenizer"):
        compose_setokim(*parts, detokenizer=parts[0])


def test_a_detokenizer_of_another_token_width_is_refused(parts: tuple[Path, Path], tmp_path: Path) -> None:
    SetokDetokenizer(tiny_detokenizer_config(token_size=7)).save_pretrained(tmp_path / "narrow")
    with pytest.raises(ValueError, match="reads 7-wide tokens, but this Setokim writes 24-wide ones"):
        compose_setokim(*parts, detokenizer=tmp_path / "narrow")
