"""SetokImageProcessor: SigLIP preprocessing on PIL/NumPy, any common input type and colour mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from transformers_setok import SetokImageProcessor


@pytest.fixture
def rgb() -> Image.Image:
    return Image.fromarray((np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8))


def reference_pixels(image: Image.Image, size: int = 384) -> torch.Tensor:
    """Resize with PIL bicubic, scale to [0, 1], normalise with mean = std = 0.5."""
    resized = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
    return torch.from_numpy((resized / 255.0 - 0.5) / 0.5).permute(2, 0, 1)


def test_defaults_are_siglip_so400m() -> None:
    processor = SetokImageProcessor()
    assert processor.size == {"height": 384, "width": 384}
    assert list(processor.image_mean) == [0.5, 0.5, 0.5] and list(processor.image_std) == [0.5, 0.5, 0.5]


def test_matches_plain_pil_reference(rgb: Image.Image) -> None:
    pixels = SetokImageProcessor()(images=rgb, return_tensors="pt").pixel_values
    assert pixels.shape == (1, 3, 384, 384)
    torch.testing.assert_close(pixels[0], reference_pixels(rgb), atol=1e-2, rtol=0)


def test_numpy_torch_and_pil_inputs_agree(rgb: Image.Image) -> None:
    processor = SetokImageProcessor()
    array = np.array(rgb)
    expected = processor(images=rgb, return_tensors="pt").pixel_values
    for image in (array, array.transpose(2, 0, 1), torch.from_numpy(array).permute(2, 0, 1)):
        torch.testing.assert_close(processor(images=image, return_tensors="pt").pixel_values, expected)
    batch = processor(images=[rgb, array], return_tensors="pt").pixel_values
    assert batch.shape == (2, 3, 384, 384)
    torch.testing.assert_close(batch[1:], expected)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_colour_modes_become_rgb(rgb: Image.Image, mode: str) -> None:
    image = rgb.convert(mode)
    pixels = SetokImageProcessor()(images=image, return_tensors="pt").pixel_values
    assert pixels.shape == (1, 3, 384, 384)
    torch.testing.assert_close(pixels[0], reference_pixels(image), atol=1e-2, rtol=0)


def test_grayscale_array_is_one_image(rgb: Image.Image) -> None:
    gray = rgb.convert("L")
    processor = SetokImageProcessor()
    from_array = processor(images=np.asarray(gray), return_tensors="pt").pixel_values
    torch.testing.assert_close(from_array, processor(images=gray, return_tensors="pt").pixel_values)
    assert torch.equal(from_array[0, 0], from_array[0, 1])


def test_save_load_round_trip(tmp_path, rgb: Image.Image) -> None:
    processor = SetokImageProcessor(size={"height": 64, "width": 64})
    processor.save_pretrained(tmp_path)
    reloaded = SetokImageProcessor.from_pretrained(tmp_path)
    assert reloaded.size == {"height": 64, "width": 64}
    torch.testing.assert_close(
        reloaded(images=rgb, return_tensors="pt").pixel_values, processor(images=rgb, return_tensors="pt").pixel_values
    )


@pytest.mark.parametrize(
    ("images", "message"),
    [
        ([], "empty list"),
        (np.zeros((10, 10, 2), dtype=np.uint8), "channels"),
        (np.full((10, 10, 3), np.nan, dtype=np.float32), "finite"),
        (np.zeros((0, 10, 3), dtype=np.uint8), "no pixels"),
    ],
)
def test_bad_images_are_named(images, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SetokImageProcessor()(images=images, return_tensors="pt")
