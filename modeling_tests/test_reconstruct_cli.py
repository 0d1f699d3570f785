"""`setok reconstruct`: original beside its reconstruction, with the token count; clear one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_setok_config
from PIL import Image
from pretraining_fixtures import tiny_pretraining_config, toy_scene

from transformers_setok import SetokForPreTraining, SetokImageProcessor, SetokModel
from transformers_setok.cli import main
from transformers_setok.cli.reconstruct import CAPTION_HEIGHT, MIN_PANEL_SIDE


@pytest.fixture
def checkpoint(tmp_path: Path) -> tuple[Path, SetokForPreTraining, SetokImageProcessor]:
    torch.manual_seed(0)
    model = SetokForPreTraining(tiny_pretraining_config()).eval()
    processor = SetokImageProcessor(size={"height": 64, "width": 64})
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    return tmp_path / "model", model, processor


def write_photo(folder: Path) -> Path:
    pixels = ((toy_scene("red", "square").permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
    path = folder / "photo.png"
    Image.fromarray(pixels).save(path)
    return path


def test_writes_original_beside_reconstruction_and_prints_the_count(checkpoint, tmp_path: Path, capsys) -> None:
    folder, model, processor = checkpoint
    photo = write_photo(tmp_path)
    assert (
        main(["reconstruct", str(photo), "--model", str(folder), "--out", str(tmp_path / "recon"), "--steps", "2"])
        == 0
    )
    with torch.no_grad():
        count = int(model.setok(processor(images=[Image.open(photo)], return_tensors="pt").pixel_values).num_tokens)
    target = tmp_path / "recon" / "photo_reconstruction.png"
    assert f"photo.png: {count} tokens -> {target}" in capsys.readouterr().out

    picture = np.asarray(Image.open(target))
    assert picture.shape == (MIN_PANEL_SIDE + CAPTION_HEIGHT, 2 * MIN_PANEL_SIDE, 3)
    original = Image.open(photo).convert("RGB").resize((8, 8), Image.Resampling.BICUBIC)
    expected_left = np.asarray(original.resize((MIN_PANEL_SIDE,) * 2, Image.Resampling.NEAREST))
    assert np.array_equal(picture[:MIN_PANEL_SIDE, :MIN_PANEL_SIDE], expected_left)
    assert picture[MIN_PANEL_SIDE:].min() < 128  # the caption is drawn


def test_a_tokenizer_only_folder_is_refused_in_one_line(tmp_path: Path) -> None:
    SetokModel(tiny_setok_config()).save_pretrained(tmp_path / "setok")
    photo = write_photo(tmp_path)
    with pytest.raises(SystemExit, match="holds a SetokConfig; reconstruction needs a SetokForPreTraining"):
        main(["reconstruct", str(photo), "--model", str(tmp_path / "setok")])


def test_missing_images_and_bad_guidance_are_refused(checkpoint, tmp_path: Path) -> None:
    folder, _, _ = checkpoint
    with pytest.raises(SystemExit, match="image file not found: nowhere.png"):
        main(["reconstruct", "nowhere.png", "--model", str(folder)])
    with pytest.raises(SystemExit, match="--guidance-scale must be >= 1"):
        main(["reconstruct", str(write_photo(tmp_path)), "--model", str(folder), "--guidance-scale", "0.5"])
