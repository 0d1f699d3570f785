"""The model card a saved Setokim gets: Hub metadata, what it is built from, its budget, and code that loads it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import randomize_weights, setokim_for
from huggingface_hub import ModelCard
from PIL import Image

from transformers_setok import SetokimProcessor


@pytest.fixture
def saved(tiny_processor: SetokimProcessor, tmp_path: Path) -> Path:
    model = randomize_weights(setokim_for(tiny_processor))
    model.config.setok_config.max_tokens = 12
    model.config.text_config._name_or_path = "lmsys/vicuna-7b-v1.5"  # as from_pretrained of a Hub model records it
    model.config.setok_config.vision_config._name_or_path = str(tmp_path / "siglip")  # a local folder: no base
    (tmp_path / "siglip").mkdir()
    model.save_pretrained(tmp_path / "tiny-setokim")
    tiny_processor.save_pretrained(tmp_path / "tiny-setokim")
    return tmp_path / "tiny-setokim"


def test_card_has_the_hub_metadata(saved: Path) -> None:
    card = ModelCard.load(saved / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-text-to-text"
    assert {"setok", "setokim", "transformers-setok"} <= set(card.data.tags)
    assert card.data.base_model == ["lmsys/vicuna-7b-v1.5"]  # the local vision folder is no Hub id
    assert "`min_tokens=1` and `max_tokens=12`" in card.text and "512-position context" in card.text
    assert "trust_remote_code=True" in card.text and "arXiv" not in card.data.to_yaml()
    assert "Towards Semantic Equivalence of Tokenization in Multimodal {LLM}" in card.text


def test_card_code_loads_the_folder_and_generates(
    saved: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    usage = re.search(r"```python\n(.*?)```", (saved / "README.md").read_text(), re.S)[1]
    assert 'from_pretrained("tiny-setokim")' in usage
    monkeypatch.chdir(saved.parent)
    Image.new("RGB", (80, 60), "orange").save("photo.jpg")
    exec(compile(usage.replace("max_new_tokens=64", "max_new_tokens=3"), "README.md", "exec"), {})
    assert capsys.readouterr().out.strip()  # some generated text


def test_an_existing_card_is_kept(tiny_processor: SetokimProcessor, tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "README.md").write_text("# my own card\n")
    setokim_for(tiny_processor).save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "README.md").read_text() == "# my own card\n"
