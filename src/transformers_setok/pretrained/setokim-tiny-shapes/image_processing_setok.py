"""Image processor of SeTok: SigLIP-style resize, rescale and normalize on the PIL/NumPy backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import ChannelDimension, PILImageResampling

SIGLIP_MEAN = [0.5, 0.5, 0.5]
SIGLIP_STD = [0.5, 0.5, 0.5]


class SetokImageProcessor(PilBackend):
    """Turns PIL images, NumPy arrays or torch tensors (one or a list) into SigLIP-ready `pixel_values`.

    Runs on PIL and NumPy alone, so it works without torchvision. Grayscale, RGBA, palette and CMYK images
    are converted to RGB by `to_rgb` (transparent pixels on white), the conversion `setok tokenize` uses too;
    arrays that cannot be an image (no pixels, non-finite values, a channel count other than 1, 3 or 4) raise a
    `ValueError` naming `images`.
    """

    resample = PILImageResampling.BICUBIC
    image_mean = SIGLIP_MEAN
    image_std = SIGLIP_STD
    size = {"height": 384, "width": 384}
    default_to_square = False
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    model_input_names = ["pixel_values"]

    @classmethod
    def for_encoder(cls, vision_config: Any) -> SetokImageProcessor:
        """The default processor resizing to a vision encoder's square input (`vision_config.image_size`)."""
        side = vision_config.image_size
        return cls(size={"height": side, "width": side})

    def process_image(self, image: Any, *args: Any, **kwargs: Any) -> np.ndarray:
        """Check one image, then convert it to a channel-first RGB array."""
        array = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image)
        if array.size == 0:
            raise ValueError(f"images: got an image with no pixels (shape {array.shape})")
        if array.ndim not in (2, 3):
            raise ValueError(
                f"images: each image must be (height, width) or have a channel axis, got shape {array.shape}"
            )
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise ValueError("images: pixel values must be finite, found NaN or infinity")
        is_array = not isinstance(image, Image.Image)  # any PIL mode converts (LA, PA, I;16, ...)
        if is_array and array.ndim == 3 and not ({array.shape[0], array.shape[-1]} & {1, 3, 4}):
            raise ValueError(f"images: expected 1, 3 or 4 channels first or last, got shape {array.shape}")
        return super().process_image(image, *args, **kwargs)

    def convert_to_rgb(self, image: Any, input_data_format: str | ChannelDimension | None = None) -> np.ndarray:
        """PIL images through `to_rgb`, so files read here and by `setok tokenize` give the same pixels."""
        if isinstance(image, Image.Image):
            return np.asarray(to_rgb(image))
        return super().convert_to_rgb(image, input_data_format=input_data_format)

    def preprocess(self, images: Any, *args: Any, **kwargs: Any):
        """Like the base `preprocess`, also taking 2-D arrays as single grayscale images."""
        if isinstance(images, (list, tuple)) and len(images) == 0:
            raise ValueError("images: got an empty list; pass at least one image")
        images = (
            [with_channel_axis(image) for image in images]
            if isinstance(images, (list, tuple))
            else with_channel_axis(images)
        )
        return super().preprocess(images, *args, **kwargs)


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as RGB; transparent pixels (an alpha band, or a palette's transparent colour) become white.

    The one conversion of the package: the image processor and `setok tokenize` both use it, so an RGBA file gives
    the same tokens from Python and from the command line (a plain `convert("RGB")` would drop the alpha and show
    whatever colour the transparent pixels happen to store, often black).
    """
    if "A" not in image.getbands() and "transparency" not in image.info:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """The image file at `path` as RGB (`to_rgb`), upright as its EXIF orientation says."""
    with Image.open(path) as image:
        return to_rgb(ImageOps.exif_transpose(image))


def with_channel_axis(image: Any) -> Any:
    """A 2-D array or tensor is one grayscale image: give it a trailing channel axis."""
    if getattr(image, "ndim", None) == 2:
        return image[..., None]
    return image


__all__ = ["SetokImageProcessor", "load_image", "to_rgb"]
