"""A rule-based reader of shapes-world images: which objects (colour and shape) an image shows, and where.

It judges what a model draws: whether a generated image shows every object its prompt names, and whether an
edited image changed what its instruction asked and kept the rest. Generated images are imperfect, so every
step tolerates mild blur and noise:

1. the background is the median colour of the image border (objects keep off it);
2. objects are the connected regions of pixels far from the background, and specks smaller than 0.3% of the
   image are ignored;
3. a region's colour is the `PALETTE` entry nearest to the median of its quarter farthest from the
   background, and the region is re-cut halfway between the background and that colour, which puts a blurred
   edge back where it was drawn;
4. its shape comes from simple geometry: a box at least twice as wide as tall is a bar; otherwise the fraction
   of its box it fills says square (about 1), circle (about pi / 4) or triangle and diamond (about 1 / 2),
   and those two differ in where they are wide (a triangle at the bottom, a diamond in the middle).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .shapes_world import DIRECTIONS, MOVE_STEP, PALETTE, Edit, parse_prompt

FOREGROUND_DISTANCE = 60.0  # RGB distance from the background that starts an object
MIN_AREA_FRACTION = 0.003  # smaller regions are noise
BAR_ASPECT = 2.0
SQUARE_FILL = 0.88
CIRCLE_FILL = 0.72
TRIANGLE_WIDTH_RATIO = 0.7  # width a quarter from the top / width a quarter from the bottom, below which: triangle
POSITION_TOLERANCE = 0.08  # how far (a fraction of the image side) an object may drift and count as kept
PALETTE_NAMES = tuple(PALETTE)
PALETTE_RGB = np.array(list(PALETTE.values()), dtype=np.float64)


@dataclass(frozen=True)
class ReadObject:
    """One object the reader found: `centre` in fractions of the image side, `bbox` in pixels (ends exclusive)."""

    colour: str
    shape: str
    centre: tuple[float, float]
    bbox: tuple[int, int, int, int]
    area: int

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


def as_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """`(height, width, 3)` float64 in [0, 255] from a PIL image, an integer array in [0, 255] or a float array
    in [0, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    if not isinstance(image, np.ndarray):
        raise TypeError(f"`image` must be a PIL image or a numpy array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"`image` must be an array of shape (height, width, 3), got {image.shape}")
    if np.issubdtype(image.dtype, np.integer):
        if image.min() < 0 or image.max() > 255:
            raise ValueError("`image` as an integer array must hold values in [0, 255]")
        return image.astype(np.float64)
    if not np.isfinite(image).all() or image.min() < 0 or image.max() > 1:
        raise ValueError("`image` as a float array must hold finite values in [0, 1]")
    return image.astype(np.float64) * 255


def connected_components(mask: np.ndarray) -> np.ndarray:
    """4-connected labels of a boolean mask (0 off the mask), by propagating the smallest pixel index of each
    region to its neighbours until nothing changes: a few dozen vectorised steps for shapes of this size."""
    height, width = mask.shape
    big = height * width
    labels = np.where(mask, np.arange(big).reshape(height, width), big)
    while True:
        padded = np.pad(labels, 1, constant_values=big)
        neighbours = np.minimum.reduce(
            [padded[1:-1, 1:-1], padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
        )
        updated = np.where(mask, neighbours, big)
        if np.array_equal(updated, labels):
            break
        labels = updated
    _, dense = np.unique(labels, return_inverse=True)
    dense = dense.reshape(height, width) + 1
    return np.where(mask, dense, 0)


def classify_shape(region: np.ndarray) -> str:
    """The shape of a boolean region cropped to its box."""
    height, width = region.shape
    if width >= BAR_ASPECT * height or height >= BAR_ASPECT * width:
        return "bar"
    fill = region.mean()
    if fill >= SQUARE_FILL:
        return "square"
    if fill >= CIRCLE_FILL:
        return "circle"
    widths = region.sum(axis=1)
    upper, lower = widths[: max(1, height // 2)], widths[height - max(1, height // 2) :]
    return "triangle" if np.median(upper) < TRIANGLE_WIDTH_RATIO * np.median(lower) else "diamond"


def read_scene(image: Image.Image | np.ndarray) -> list[ReadObject]:
    """The objects an image of the shapes world shows, top to bottom then left to right."""
    pixels = as_rgb_array(image)
    height, width, _ = pixels.shape
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    distance = np.linalg.norm(pixels - background, axis=-1)
    labels = connected_components(distance > FOREGROUND_DISTANCE)
    min_area = MIN_AREA_FRACTION * height * width
    objects = []
    for label in range(1, labels.max() + 1):
        region = labels == label
        core = region & (distance >= np.percentile(distance[region], 75))
        nearest = int(np.argmin(np.linalg.norm(PALETTE_RGB - np.median(pixels[core], axis=0), axis=-1)))
        region &= distance > np.linalg.norm(PALETTE_RGB[nearest] - background) / 2
        area = int(region.sum())
        if area < min_area:
            continue
        ys, xs = np.nonzero(region)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        objects.append(
            ReadObject(
                colour=PALETTE_NAMES[nearest],
                shape=classify_shape(region[y0:y1, x0:x1]),
                centre=(float(xs.mean() + 0.5) / width, float(ys.mean() + 0.5) / height),
                bbox=(int(x0), int(y0), int(x1), int(y1)),
                area=area,
            )
        )
    return sorted(objects, key=lambda item: (item.bbox[1], item.bbox[0]))


def shows_prompt(image: Image.Image | np.ndarray, prompt: str) -> bool:
    """Whether the image shows every object the prompt names, at least as many of each kind (extra objects are
    allowed). A prompt that names no object is a ValueError."""
    wanted = parse_prompt(prompt)
    if not wanted:
        raise ValueError(f"`prompt` names no shapes-world object (like 'a red circle'): {prompt!r}")
    seen = Counter((item.colour, item.shape) for item in read_scene(image))
    return all(seen[kind] >= count for kind, count in wanted.items())


def same_objects(first: list[ReadObject], second: list[ReadObject]) -> bool:
    """Whether two readings show the same objects at the same places (within `POSITION_TOLERANCE`)."""
    if len(first) != len(second):
        return False
    unmatched = list(second)
    for item in first:
        match = next((other for other in unmatched if other.name == item.name and near(item, other)), None)
        if match is None:
            return False
        unmatched.remove(match)
    return True


def near(first: ReadObject, second: ReadObject) -> bool:
    return np.hypot(first.centre[0] - second.centre[0], first.centre[1] - second.centre[1]) <= POSITION_TOLERANCE


def moved(before: ReadObject, after: ReadObject, direction: str) -> bool:
    """Whether `after` is `before` shifted at least half a `MOVE_STEP` that way, and little across."""
    dx, dy = DIRECTIONS[direction]
    shift_x, shift_y = after.centre[0] - before.centre[0], after.centre[1] - before.centre[1]
    along, across = shift_x * dx + shift_y * dy, abs(shift_x * dy - shift_y * dx)
    return along >= MOVE_STEP / 2 and across <= POSITION_TOLERANCE


def edit_applied(
    source_image: Image.Image | np.ndarray, edited_image: Image.Image | np.ndarray, instruction: str
) -> bool:
    """Whether `edited_image` is `source_image` changed as the instruction asks and otherwise kept: the named
    object recoloured, removed or moved (the source must show exactly one of it), or the named object added,
    with every other object unchanged and in place."""
    edit = Edit.parse(instruction)
    before, after = read_scene(source_image), read_scene(edited_image)
    name = f"{edit.colour} {edit.shape}"
    if edit.operation == "add":
        candidates = [item for item in after if item.name == name]
        return any(same_objects(before, [item for item in after if item is not added]) for added in candidates)
    targets = [item for item in before if item.name == name]
    if len(targets) != 1:
        return False
    target = targets[0]
    rest = [item for item in before if item is not target]
    if edit.operation == "remove":
        return same_objects(rest, after)
    if edit.operation == "recolour":
        changed = [item for item in after if item.name == f"{edit.value} {edit.shape}" and near(item, target)]
    else:
        changed = [item for item in after if item.name == name and moved(target, item, edit.value)]
    return any(same_objects(rest, [item for item in after if item is not new]) for new in changed)
