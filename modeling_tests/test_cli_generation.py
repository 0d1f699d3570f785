"""`setok generate`, `setok edit` and `setok segment` on a saved Setokim folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import setokim_for
from PIL import Image
from pretraining_fixtures import tiny_detokenizer_config

from transformers_setok import SetokDetokenizer
from transformers_setok.cli import main


@pytest.fixture
def setokim_folder(tiny_processor, tmp_path: Path) -> Path:
    model = setokim_for(tiny_processor, vision_output_head=True, mask_decoder_config=dict(hidden_size=16))
    model.add_image_generation(SetokDetokenizer(tiny_detokenizer_config()))
    model.save_pretrained(tmp_path / "setokim")
    tiny_processor.save_pretrained(tmp_path / "setokim")
    return tmp_path / "setokim"


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    path = tmp_path / "photo.png"
    Image.new("RGB", (80, 48), (200, 40, 40)).save(path)
    return path


def test_generate_edit_and_segment_write_their_pictures(
    setokim_folder: Path, photo: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    model = ["--model", str(setokim_folder)]
    out = tmp_path / "out"
    assert (
        main(["generate", "A red circle.", *model, "--out", str(out), "--steps", "2", "--max-image-tokens", "3"]) == 0
    )
    assert main(["edit", str(photo), "Make it green.", *model, "--out", str(out), "--steps", "2"]) == 0
    assert main(["segment", str(photo), "the red square", *model, "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("'A red circle.': ") and printed[0].endswith(
        f"vision tokens -> {out / 'generated.png'}"
    )
    assert printed[1].endswith(f"-> {out / 'photo_edited.png'}")
    assert printed[2].startswith("'the red square' in ") and printed[2].endswith(f"-> {out / 'photo_mask.png'}")
    assert Image.open(out / "generated.png").size == (8, 8)  # the detokenizer's size
    assert Image.open(out / "photo_mask.png").size == (80, 48)  # the photo's own size

    tokens = int(printed[0].split(": ")[1].split()[0])
    assert 1 <= tokens <= 3


def test_errors_are_one_line(setokim_folder: Path, photo: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"^setok generate: error: --model /no/such is no checkpoint folder"):
        main(["generate", "A red circle.", "--model", "/no/such"])
    with pytest.raises(SystemExit, match=r"^setok segment: error: image file not found"):
        main(["segment", str(tmp_path / "missing.png"), "the cat", "--model", str(setokim_folder)])
    torch.manual_seed(0)
    with pytest.raises(SystemExit, match=r"^setok edit: error: .*holds a SetokDetokenizerConfig; pass a Setokim"):
        SetokDetokenizer(tiny_detokenizer_config()).save_pretrained(tmp_path / "detok")
        main(["edit", str(photo), "Make it green.", "--model", str(tmp_path / "detok")])
