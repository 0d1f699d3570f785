"""The project's `evaluate` modules, loaded by local path, equal hand computations."""

from __future__ import annotations

import math

import evaluate
import numpy as np
import pytest
from PIL import Image

from transformers_setok import load_metric, shapes_world
from transformers_setok.metrics import METRIC_NAMES, metric_path


@pytest.mark.parametrize("name", METRIC_NAMES)
def test_every_metric_loads_by_its_local_path(name: str) -> None:
    config = "editing" if name == "scene_checks" else None
    module = evaluate.load(metric_path(name), config)
    assert isinstance(module, evaluate.Metric)
    assert module.name == name


def test_answer_accuracy_matches_after_normalisation() -> None:
    accuracy = load_metric("answer_accuracy")
    result = accuracy.compute(
        predictions=["Three.", "the Circle", " red ", "no", "blue square"],
        references=["3", "circle", "red", "yes", "square"],
    )
    assert result == {"accuracy": 3 / 5}


def mask(rows: list[str]) -> np.ndarray:
    return np.array([[char == "#" for char in row] for row in rows])


def test_referring_iou_by_hand_including_empty_targets() -> None:
    iou = load_metric("referring_iou")
    predictions = [
        mask(["##..", "##..", "....", "...."]),
        mask(["....", "...."]),
        mask(["#..", "..."]),
        mask(["..", ".."]),
    ]
    references = [
        mask(["####", "####", "....", "...."]),
        mask(["....", "...."]),
        mask(["...", "..."]),
        mask(["#.", ".."]),
    ]
    # per image: 4/8, both empty -> 1, an object where none was referred -> 0, a missed object -> 0
    result = iou.compute(predictions=predictions, references=references)
    assert result["giou"] == pytest.approx((0.5 + 1 + 0 + 0) / 4)
    assert result["ciou"] == pytest.approx((4 + 0 + 0 + 0) / (8 + 0 + 1 + 1))
    assert iou.compute(predictions=[mask([".."])], references=[mask([".."])]) == {"giou": 1.0, "ciou": 1.0}
    with pytest.raises(ValueError, match=r"predictions\[0\]"):
        iou.compute(predictions=[mask(["##"])], references=[mask(["#", "#"])])


def test_reconstruction_psnr_by_hand() -> None:
    psnr = load_metric("reconstruction_psnr")
    original = np.zeros((2, 2, 3))
    off_by_a_tenth = np.full((2, 2, 3), 0.1)  # MSE 0.01: 20 dB
    half_off = original.copy()
    half_off[0] = 0.2  # MSE 0.02: 10 log10(50)
    result = psnr.compute(predictions=[off_by_a_tenth, half_off], references=[original, original])
    assert result["psnr"] == pytest.approx((20 + 10 * math.log10(50)) / 2)
    uint8 = psnr.compute(
        predictions=[np.full((4, 4, 3), 110, np.uint8)], references=[np.full((4, 4, 3), 100, np.uint8)], data_range=255
    )
    assert uint8["psnr"] == pytest.approx(10 * math.log10(255**2 / 100))
    assert psnr.compute(predictions=[original], references=[original])["psnr"] == math.inf
    with pytest.raises(ValueError, match="data_range=255"):
        psnr.compute(predictions=[np.full((2, 2, 3), 110.0)], references=[np.full((2, 2, 3), 100.0)])


def test_scene_checks_count_what_the_reader_accepts() -> None:
    world = shapes_world(seed=5, num_scenes=4, tasks=["text_to_image", "editing"])
    images, prompts = world["text_to_image"]["image"], world["text_to_image"]["prompt"]
    blank = Image.new("RGB", images[0].size, (240, 240, 240))
    text_to_image = load_metric("scene_checks", "text_to_image")
    assert text_to_image.compute(predictions=[*images[:3], blank], references=prompts) == {"accuracy": 3 / 4}

    edits = world["editing"]
    editing = load_metric("scene_checks", "editing")
    result = editing.compute(
        sources=edits["source_image"],
        predictions=[*edits["edited_image"][:2], *edits["source_image"][2:]],  # the last two left unedited
        references=edits["instruction"],
    )
    assert result == {"accuracy": 2 / len(edits)}


def test_bad_names_are_refused() -> None:
    with pytest.raises(ValueError, match="name"):
        load_metric("accuracy")
    with pytest.raises(ValueError, match="config_name"):
        load_metric("scene_checks", "captions")
