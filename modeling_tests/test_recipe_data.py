"""A recipe's own data (`data.train_files`): referring-segmentation records whose masks are image files, read as
their images are (relative to `data.image_folder`, or absolute), nonzero pixels the object."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from transformers_setok.recipes import StageConfig
from transformers_setok.recipes.recipe import data_files
from transformers_setok.training import SetokimDataCollator, read_mask

HEIGHT, WIDTH = 48, 40


def region(top: int, left: int) -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), dtype=bool)
    mask[top : top + 20, left : left + 16] = True
    return mask


def referring_record(image: str, mask: str | None) -> dict:
    turn = {"from": "human", "value": "<image>\nSegment the red square."}
    record = {"conversations": [turn], "image": image}
    if mask is None:  # a caption: no mask, an answer instead
        record["conversations"] = [turn | {"value": "<image>\nDescribe the image."}, {"from": "gpt", "value": "Red."}]
    return record | ({} if mask is None else {"mask": mask})


def test_masks_given_as_image_files_train_as_the_arrays_they_hold(tmp_path: Path, tiny_processor) -> None:
    folder = tmp_path / "data"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    rng = np.random.default_rng(0)
    for index in range(2):
        pixels = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "images" / f"{index}.png")
    masks = [region(4, 6), region(20, 18)]
    # a grey-level mask (0 / 255), read from the image folder; a palette mask whose object is index 3, by an
    # absolute path
    Image.fromarray(masks[0].astype(np.uint8) * 255).save(folder / "masks" / "0.png")
    palette = Image.frombytes("P", (WIDTH, HEIGHT), (masks[1].astype(np.uint8) * 3).tobytes())
    palette.putpalette([0, 0, 0, 255, 255, 255, 0, 0, 0, 255, 0, 0])  # index 3 is red
    palette.save(tmp_path / "elsewhere.png")
    records = [
        referring_record("images/0.png", "masks/0.png"),
        referring_record("images/1.png", str(tmp_path / "elsewhere.png")),
        referring_record("images/1.png", None),
    ]
    train_file = tmp_path / "referring.jsonl"
    train_file.write_text("".join(json.dumps(record) + "\n" for record in records))
    config = StageConfig(stage=3, data={"train_files": [str(train_file)], "image_folder": str(folder)}, training={})
    dataset = data_files(config)

    collator = SetokimDataCollator(tiny_processor, image_folder=config.data["image_folder"], mask_size=(24, 20))
    batch = collator(list(dataset))
    in_memory = [{**record, "mask": mask} for record, mask in zip(records[:2], masks)] + [records[2]]
    expected = collator(in_memory)
    assert batch.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(batch[name], value, msg=name)
    assert batch["target_mask_rows"].tolist() == [True, True, False]
    assert batch["pixel_values"].shape[0] == 5  # each referring example's image and its region answer; the caption's


def test_a_colour_mask_is_the_object_wherever_any_channel_is_nonzero(tmp_path: Path) -> None:
    pixels = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
    pixels[region(4, 6)] = (0, 0, 1)
    Image.fromarray(pixels).save(tmp_path / "mask.png")
    np.testing.assert_array_equal(read_mask("mask.png", tmp_path), region(4, 6))
    np.testing.assert_array_equal(read_mask(region(0, 0), tmp_path), region(0, 0))  # arrays as they are
