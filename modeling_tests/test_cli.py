"""The `setok tokenize` command end to end, through `main(argv)`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

from transformers_setok import SetokImageProcessor, SetokModel
from transformers_setok.cli import main, sample_image_paths

COUNT_LINE = re.compile(r"^(?P<path>.+): (?P<count>\d+) tokens? -> (?P<target>.+)$")


def run_tokenize(capsys: pytest.CaptureFixture, *argv: str) -> tuple[dict[str, int], str]:
    """Run `setok tokenize` and return the token count printed for each image stem, and stderr."""
    main(["tokenize", *argv])
    captured = capsys.readouterr()
    counts = {}
    for line in captured.out.splitlines():
        match = COUNT_LINE.match(line)
        assert match, f"unexpected output line: {line!r}"
        assert Path(match["target"]).is_file()
        counts[Path(match["path"]).stem] = int(match["count"])
    return counts, captured.err


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


def test_budget_and_threshold_flags(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    clutter = str(sample_image_paths()[2])
    bounded, _ = run_tokenize(capsys, clutter, "--out", str(tmp_path), "--max-tokens", "3")
    assert bounded == {"clutter": 3}
    strict, _ = run_tokenize(capsys, clutter, "--out", str(tmp_path), "--threshold", "100", "--min-tokens", "2")
    assert strict == {"clutter": 2}


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


def test_checkpoint_without_image_processor_falls_back(
    tiny_setok: SetokModel, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    tiny_setok.save_pretrained(tmp_path / "model")
    counts, err = run_tokenize(
        capsys, str(sample_image_paths()[1]), "--model", str(tmp_path / "model"), "--out", str(tmp_path)
    )
    assert "64x64" in err
    assert list(counts) == ["shapes"]


def test_missing_image_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.png"
    with pytest.raises(SystemExit, match=re.escape(str(missing))):
        main(["tokenize", str(sample_image_paths()[0]), str(missing), "--out", str(tmp_path)])
    assert not list(tmp_path.glob("*_tokens.png"))


def test_unreadable_image_names_the_path(tmp_path: Path) -> None:
    bogus = tmp_path / "notes.png"
    bogus.write_text("not an image")
    with pytest.raises(SystemExit, match=re.escape(str(bogus))):
        main(["tokenize", str(bogus), "--out", str(tmp_path)])


def test_clashing_image_names_are_refused(tmp_path: Path) -> None:
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (32, 32)).save(tmp_path / folder / "photo.png")
    with pytest.raises(SystemExit, match="photo"):
        main(["tokenize", str(tmp_path / "a" / "photo.png"), str(tmp_path / "b" / "photo.png")])


def test_bad_budget_is_a_clean_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="max_tokens"):
        main(["tokenize", "--out", str(tmp_path), "--min-tokens", "5", "--max-tokens", "2"])
