"""The `setok` command end to end, through `main(argv)`: tokenize, convert, compose, --version."""

from __future__ import annotations

import csv
import functools
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize_weights, tiny_setokim_config
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import SiglipVisionConfig, SiglipVisionModel

import transformers_setok
from transformers_setok import (
    SetokImageProcessor,
    SetokimForConditionalGeneration,
    SetokimModel,
    SetokimProcessor,
    SetokModel,
)
from transformers_setok.cli import demo_tokenizer, main, sample_image_paths

COUNT_LINE = re.compile(r"^(?P<path>.+): (?P<count>\d+) tokens?( -> (?P<target>.+))?$")
STATISTICS_LINE = re.compile(r"^\d+ images?: .* tokens per image on average")


def run_tokenize(capsys: pytest.CaptureFixture, *argv: str) -> tuple[dict[str, int], str]:
    """Run `setok tokenize` and return the token count printed for each image stem, and stderr."""
    assert main(["tokenize", *argv]) == 0
    captured = capsys.readouterr()
    counts = {}
    for line in captured.out.splitlines():
        if STATISTICS_LINE.match(line) or line.startswith("counts written to "):
            continue
        match = COUNT_LINE.match(line)
        assert match, f"unexpected output line: {line!r}"
        assert match["target"] is None or Path(match["target"]).is_file()
        counts[Path(match["path"]).stem] = int(match["count"])
    return counts, captured.err


@functools.cache
def demo() -> tuple[SetokModel, SetokImageProcessor]:
    return demo_tokenizer()


def demo_counts(images: list[Image.Image], **overrides) -> list[int]:
    """Token counts of the demo tokenizer called from Python, the reference for the command's counts."""
    model, processor = demo()
    with torch.no_grad():
        return model(processor(images, return_tensors="pt").pixel_values, **overrides).num_tokens.tolist()


def test_sample_images_are_bundled() -> None:
    paths = sample_image_paths()
    assert [path.name for path in paths] == ["flat.png", "shapes.png", "clutter.png"]
    for path in paths:
        with Image.open(path) as image:
            assert image.size == (128, 128)


def test_demo_tokenizer_on_sample_images(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    counts, err = run_tokenize(capsys, "--out", str(tmp_path))
    assert "untrained" in err
    assert set(counts) == {"flat", "shapes", "clutter"}
    # Token counts follow the image's complexity even with random weights.
    assert counts["flat"] < counts["shapes"] < counts["clutter"]
    for stem in counts:
        with Image.open(tmp_path / f"{stem}_tokens.png") as overlay:
            assert overlay.size == (256, 256)
            assert overlay.mode == "RGB"
    assert len(list(tmp_path.iterdir())) == 3


def test_knobs_match_the_model_called_directly(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    clutter = sample_image_paths()[2]
    bounded, _ = run_tokenize(capsys, str(clutter), "--no-overlays", "--max-tokens", "3")
    assert bounded == {"clutter": 3}
    strict, _ = run_tokenize(capsys, str(clutter), "--no-overlays", "--threshold", "100", "--min-tokens", "2")
    assert strict == {"clutter": 2}
    few_neighbours, _ = run_tokenize(capsys, str(clutter), "--no-overlays", "--cluster-k", "2")
    expected = demo_counts([Image.open(clutter).convert("RGB")], cluster_k=2)
    assert [few_neighbours["clutter"]] == expected != demo_counts([Image.open(clutter).convert("RGB")])
    assert not list(tmp_path.iterdir())  # --no-overlays writes nothing


def test_folder_and_glob_with_an_unreadable_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for index, path in enumerate(sample_image_paths()):
        Image.open(path).rotate(90 * index).save(photos / f"{index}_{path.stem}.png")
    Image.fromarray(rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)).save(photos / "3_noise.jpg")
    (photos / "2_broken.png").write_bytes(b"\x89PNG not really")
    (photos / "notes.txt").write_text("not an image, and not named like one: left out")

    argv = [str(photos), "--counts", str(tmp_path / "counts.json"), "--batch-size", "2", "--no-overlays"]
    assert main(["tokenize", *argv]) == 0
    captured = capsys.readouterr()
    counts = json.loads((tmp_path / "counts.json").read_text())
    readable = sorted(
        path for path in photos.iterdir() if path.suffix in (".png", ".jpg") and "broken" not in path.name
    )
    assert list(counts) == [str(path) for path in readable]
    assert list(counts.values()) == demo_counts([Image.open(path).convert("RGB") for path in readable])
    assert "skipped 1 of 5 files" in captured.err and "2_broken.png" in captured.err
    values = list(counts.values())
    assert f"min {min(values)}, max {max(values)}" in captured.out and f"{sum(values)} in all" in captured.out

    assert main(["tokenize", str(photos / "*_*.png"), "--counts", str(tmp_path / "counts.csv"), "--no-overlays"]) == 0
    with (tmp_path / "counts.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert {row["path"]: int(row["num_tokens"]) for row in rows} == {
        key: value for key, value in counts.items() if key.endswith(".png")
    }


def test_transparent_pixels_as_in_python(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """An RGBA file gives the same tokens from the command line as through the image processor."""
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (128, 128, 4), dtype=np.uint8)  # colours hidden under transparency
    rgba[..., 3] = 0
    rgba[32:96, 32:96] = (200, 30, 30, 255)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "sticker.png")
    counts, _ = run_tokenize(capsys, str(tmp_path / "sticker.png"), "--no-overlays")
    with Image.open(tmp_path / "sticker.png") as image:
        assert [counts["sticker"]] == demo_counts([image])
        assert demo_counts([image]) != demo_counts([image.convert("RGB")])  # the hidden colours would count


def test_loads_a_saved_checkpoint(tiny_setok: SetokModel, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tiny_setok.config.max_tokens = 2
    tiny_setok.save_pretrained(tmp_path / "model")
    SetokImageProcessor(size={"height": 64, "width": 64}).save_pretrained(tmp_path / "model")
    photo = tmp_path / "photo.jpg"
    Image.open(sample_image_paths()[2]).resize((300, 200)).save(photo)

    counts, err = run_tokenize(capsys, str(photo), "--model", str(tmp_path / "model"), "--out", str(tmp_path / "out"))
    assert "warning" not in err
    assert counts == {"photo": 2}  # the checkpoint's own max_tokens applies
    with Image.open(tmp_path / "out" / "photo_tokens.png") as overlay:
        assert overlay.size == (384, 256)  # aspect kept, shorter side 256


@pytest.mark.parametrize("model_class", [SetokimForConditionalGeneration, SetokimModel])
def test_setokim_folder_is_tokenized_by_its_own_setok(
    model_class: type, tiny_processor: SetokimProcessor, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    setokim = randomize_weights(model_class(tiny_setokim_config()), seed=3).eval()
    setokim.save_pretrained(tmp_path / "setokim")
    tiny_processor.save_pretrained(tmp_path / "setokim")  # as from_parts, compose and conversion write it
    capsys.readouterr()
    counts, err = run_tokenize(
        capsys, "--model", str(tmp_path / "setokim"), "--no-overlays", "--counts", str(tmp_path / "counts.json")
    )
    assert err == ""  # no load report, no fallback processor
    processor = tiny_processor.image_processor
    images = [Image.open(path).convert("RGB") for path in sample_image_paths()]
    setok = setokim.model.setok if model_class is SetokimForConditionalGeneration else setokim.setok
    with torch.no_grad():
        expected = setok(processor(images, return_tensors="pt").pixel_values).num_tokens.tolist()
    assert list(json.loads((tmp_path / "counts.json").read_text()).values()) == expected
    fresh = SetokModel(setok.config).eval()  # what a silent re-initialisation would have counted
    with torch.no_grad():
        assert fresh(processor(images, return_tensors="pt").pixel_values).num_tokens.tolist() != expected


def test_vision_encoder_folder_is_refused(tmp_path: Path) -> None:
    config = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=64, patch_size=8
    )
    SiglipVisionModel(config).save_pretrained(tmp_path / "siglip")
    with pytest.raises(
        SystemExit, match=r"siglip_vision_model model, not a SeTok.*pass a SeTok folder.*setok compose"
    ):
        main(["tokenize", "--model", str(tmp_path / "siglip"), "--out", str(tmp_path)])


def test_missing_weights_are_an_error(tiny_setok: SetokModel, tmp_path: Path) -> None:
    tiny_setok.save_pretrained(tmp_path / "model")
    weights = load_file(tmp_path / "model" / "model.safetensors")
    del weights["merger.out.bias"]
    save_file(weights, tmp_path / "model" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SystemExit, match=r"weights 1 missing \(e\.g\. merger\.out\.bias\); refusing to tokenize"):
        main(["tokenize", "--model", str(tmp_path / "model"), "--no-overlays"])


def test_checkpoint_without_image_processor_falls_back(
    tiny_setok: SetokModel, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    tiny_setok.save_pretrained(tmp_path / "model")
    counts, err = run_tokenize(
        capsys, str(sample_image_paths()[1]), "--model", str(tmp_path / "model"), "--out", str(tmp_path)
    )
    assert "64x64" in err
    assert list(counts) == ["shapes"]


def test_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "transformers_setok.cli", "tokenize", str(sample_image_paths()[0]),
         "--model", "/no/such/dir"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "setok tokenize: error: --model /no/such/dir is no checkpoint folder here nor a model id the Hub could give; "
        "pass a SeTok folder (SetokModel.save_pretrained, `setok convert`) or a Setokim folder"
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["nowhere.png"], "image file not found: nowhere.png"),
        (["nothing*.png"], "no file matches nothing"),
        (["--counts", "counts.txt"], "name a .json or .csv file"),
        (["--device", "no-such-device"], "--device no-such-device: .*pass --device cpu"),
        (["--min-tokens", "5", "--max-tokens", "2"], "max_tokens"),
    ],
)
def test_bad_arguments_are_clean_errors(
    argv: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=message) as error:
        main(["tokenize", *argv, "--no-overlays"])
    assert "\n" not in str(error.value.code)


def test_only_unreadable_files_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bogus = tmp_path / "notes.png"
    bogus.write_text("not an image")
    with pytest.raises(SystemExit, match="none of the files is a readable image"):
        main(["tokenize", str(bogus), "--out", str(tmp_path)])
    assert str(bogus) in capsys.readouterr().err


def test_clashing_image_names_are_refused(tmp_path: Path) -> None:
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (32, 32)).save(tmp_path / folder / "photo.png")
    with pytest.raises(SystemExit, match="photo.*--no-overlays"):
        main(["tokenize", str(tmp_path / "a" / "photo.png"), str(tmp_path / "b" / "photo.png")])


def test_version_and_installed_conversion_commands(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"setok {transformers_setok.__version__}\n"
    for command, flag in (("convert", "--allow-partial"), ("compose", "--language-model")):
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        assert done.value.code == 0 and flag in capsys.readouterr().out
    with pytest.raises(SystemExit, match="2"):  # argparse's usage error: the options are the scripts' own
        main(["convert", "--output", "out", "--no-such-flag"])
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
    assert main(["compose", "--vision", "/no/such/siglip", "--language-model", "/no/llm", "--output", "out"]) == 1
    assert capsys.readouterr().err == (
        "error: vision: no folder '/no/such/siglip'; pass a vision encoder or SeTok folder (or a Hub model id)\n"
    )
