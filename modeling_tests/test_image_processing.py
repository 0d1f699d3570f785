"""SetokImageProcessor: SigLIP preprocessing on PIL/NumPy, any common input type and colour mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from transformers_setok import SetokImageProcessor
from transformers_setok.image_processing_setok import load_image, to_rgb


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


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_become_white(tmp_path, mode: str) -> None:
    """Alpha bands and a palette's transparent colour composite onto white, in the processor and from files."""
    rng = np.random.default_rng(2)
    rgba = rng.integers(0, 256, (24, 32, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(np.arange(32) < 16, 0, 255)[None, :]  # left half transparent, right half opaque
    if mode == "P":
        image = Image.fromarray(rgba[..., :3]).quantize(8)
        image.info["transparency"] = int(np.asarray(image)[0, 0])
        visible = np.asarray(image.convert("RGB"))
        hidden = np.asarray(image) == image.info["transparency"]
        expected = np.where(hidden[..., None], 255, visible)
    else:
        image = Image.fromarray(rgba, "RGBA").convert(mode)
        color = np.asarray(image.convert("RGBA"))[..., :3].astype(np.float64)
        alpha = rgba[..., 3:] / 255.0
        expected = np.round(alpha * color + (1 - alpha) * 255)
    np.testing.assert_array_equal(np.asarray(to_rgb(image)), expected)
    image.save(tmp_path / "image.png")
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "image.png")), expected)
    processor = SetokImageProcessor(size={"height": 24, "width": 32}, do_resize=False)
    expected_pixels = torch.from_numpy((expected / 255.0 - 0.5) / 0.5).permute(2, 0, 1).float()
    torch.testing.assert_close(processor(images=image, return_tensors="pt").pixel_values[0], expected_pixels)


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
