"""Pictures of SeTok tokens: each token's region of the image, tinted in its own colour and numbered.

Pure functions on an image and a patch-to-token assignment (`SetokModelOutput.assignment` of one image), so
they work for any checkpoint and need no model. A token's region can be scattered over the image (its patches are
alike, not necessarily adjacent), so every piece carries the token's index, and the token's centre (the density
peak its cluster grew from) is a circled index.
"""

from __future__ import annotations

import colorsys

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

GOLDEN_RATIO_CONJUGATE = 0.618033988749895
BOUNDARY_COLOR = (20, 20, 28)
LEGEND_BACKGROUND = (20, 20, 28, 190)
LEGEND_TEXT = (255, 255, 255, 255)
MARK_TEXT = (255, 255, 255)
MARK_OUTLINE = (20, 20, 28)
MIN_LABELLED_PIECE = 2  # patches a piece away from the centre needs to be numbered; stray single patches are not


def token_palette(num_tokens: int) -> np.ndarray:
    """`(num_tokens, 3)` uint8 colours, the same for a token index in every picture.

    Hues step by the golden ratio, so consecutive tokens (often neighbours on the image) get well-separated
    hues; saturation and brightness alternate too, so tokens whose hues the walk brings close still differ.
    """
    colors = np.zeros((num_tokens, 3))
    for index in range(num_tokens):
        hue = (index * GOLDEN_RATIO_CONJUGATE) % 1.0
        saturation = 0.8 if index % 2 == 0 else 0.6
        value = 0.85 if index % 3 == 2 else 1.0
        colors[index] = colorsys.hsv_to_rgb(hue, saturation, value)
    return np.round(colors * 255).astype(np.uint8)


def patch_labels(assignment: torch.Tensor | np.ndarray, grid_size: tuple[int, int]) -> np.ndarray:
    """The assignment of one image as a `(grid_height, grid_width)` int64 array, checked against the grid."""
    labels = np.asarray(assignment.detach().cpu() if isinstance(assignment, torch.Tensor) else assignment)
    grid_height, grid_width = grid_size
    if labels.shape != (grid_height * grid_width,):
        raise ValueError(
            f"assignment must have shape ({grid_height * grid_width},) for a {grid_height}x{grid_width} patch grid, "
            f"got {labels.shape}"
        )
    if labels.dtype.kind not in "iu":
        raise TypeError(f"assignment must hold integer token indices, got dtype {labels.dtype}")
    return labels.astype(np.int64).reshape(grid_height, grid_width)


def token_label_map(
    assignment: torch.Tensor | np.ndarray, grid_size: tuple[int, int], size: tuple[int, int]
) -> np.ndarray:
    """Nearest-neighbour upsampling of a patch assignment to a `(height, width)` label map.

    Args:
        assignment: `(num_patches,)` token index of every patch in row-major order; -1 for patches of no token.
        grid_size: `(height, width)` of the patch grid.
        size: `(height, width)` of the label map, usually the image's.

    Pixel `(y, x)` takes the label of the patch that covers it when the grid is stretched over the whole
    image, which is how the image processor resized the image for the encoder.
    """
    labels = patch_labels(assignment, grid_size)
    height, width = size
    rows = np.arange(height) * grid_size[0] // height
    cols = np.arange(width) * grid_size[1] // width
    return labels[rows[:, None], cols[None, :]]


def region_boundaries(label_map: np.ndarray) -> np.ndarray:
    """Pixels whose label differs from a 4-neighbour's: a line two pixels wide along every region edge."""
    boundary = np.zeros(label_map.shape, dtype=bool)
    vertical = label_map[1:, :] != label_map[:-1, :]
    horizontal = label_map[:, 1:] != label_map[:, :-1]
    boundary[1:, :] |= vertical
    boundary[:-1, :] |= vertical
    boundary[:, 1:] |= horizontal
    boundary[:, :-1] |= horizontal
    return boundary


def token_pieces(labels: np.ndarray) -> list[tuple[int, list[tuple[int, int]]]]:
    """The 4-connected pieces of every token on a `(grid_height, grid_width)` label map, as `(token, patches)`."""
    seen = labels < 0
    pieces = []
    for start in zip(*np.nonzero(~seen)):
        if seen[start]:
            continue
        token, patches, frontier = int(labels[start]), [], [start]
        seen[start] = True
        while frontier:
            row, col = frontier.pop()
            patches.append((int(row), int(col)))
            for near in ((row - 1, col), (row + 1, col), (row, col - 1), (row, col + 1)):
                inside = 0 <= near[0] < labels.shape[0] and 0 <= near[1] < labels.shape[1]
                if inside and not seen[near] and labels[near] == token:
                    seen[near] = True
                    frontier.append(near)
        pieces.append((token, patches))
    return pieces


def piece_anchor(patches: list[tuple[int, int]]) -> tuple[int, int]:
    """The patch of a piece nearest its mean position: a place inside the piece, even for a ring or an L."""
    mean = np.mean(patches, axis=0)
    return min(patches, key=lambda patch: float(((np.array(patch) - mean) ** 2).sum()))


def draw_token_marks(
    image: Image.Image, labels: np.ndarray, centers: np.ndarray | None, palette: np.ndarray
) -> Image.Image:
    """The token's index on each piece of its region (single stray patches aside), circled on its centre patch.

    Without `centers`, the largest piece of a token stands for its centre.
    """
    grid_height, grid_width = labels.shape
    cell_height, cell_width = image.height / grid_height, image.width / grid_width
    font_size = max(8, round(0.7 * min(cell_height, cell_width)))
    font = ImageFont.load_default(size=font_size)
    draw = ImageDraw.Draw(image)
    pieces = token_pieces(labels)
    if centers is None:
        largest: dict[int, tuple[int, int]] = {}
        for token, patches in sorted(pieces, key=lambda piece: len(piece[1])):
            largest[token] = piece_anchor(patches)
        center_patches = largest
    else:
        center_patches = {
            token: divmod(int(center), grid_width) for token, center in enumerate(centers) if center >= 0
        }
    for token, patches in pieces:
        center = center_patches.get(token)
        is_center_piece = center in patches
        if not is_center_piece and len(patches) < MIN_LABELLED_PIECE:
            continue
        row, col = center if is_center_piece else piece_anchor(patches)
        x, y = (col + 0.5) * cell_width, (row + 0.5) * cell_height
        if is_center_piece:
            radius = 0.75 * font_size
            color = tuple(int(channel) for channel in palette[token])
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=color, outline=MARK_OUTLINE, width=2)
        draw.text((x, y), str(token), font=font, fill=MARK_TEXT, anchor="mm", stroke_width=2, stroke_fill=MARK_OUTLINE)
    return image


def draw_legend(image: Image.Image, num_tokens: int) -> Image.Image:
    """A translucent box in the top-left corner saying how many tokens the image became."""
    text = f"{num_tokens} token" if num_tokens == 1 else f"{num_tokens} tokens"
    font_size = max(10, min(image.size) // 16)
    font = ImageFont.load_default(size=font_size)
    overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    margin, padding = font_size // 2, font_size // 3
    left, top, right, bottom = draw.textbbox((margin + padding, margin + padding), text, font=font)
    draw.rectangle((margin, margin, right + padding, bottom + padding), fill=LEGEND_BACKGROUND)
    draw.text((margin + padding, margin + padding), text, font=font, fill=LEGEND_TEXT)
    return Image.alpha_composite(image.convert("RGBA"), overlay).convert("RGB")


def draw_token_regions(
    image: Image.Image,
    assignment: torch.Tensor | np.ndarray,
    grid_size: tuple[int, int],
    centers: torch.Tensor | np.ndarray | None = None,
    alpha: float = 0.45,
    mark_tokens: bool = True,
) -> Image.Image:
    """Tint each token's region of `image` in its own colour, outline and number the regions, state the count.

    Args:
        image: the picture the tokens were computed from, at any display size (it is not resized).
        assignment: `(num_patches,)` token index of every patch of one image, e.g. `outputs.assignment[i]`;
            patches with -1 (no token) keep their pixels.
        grid_size: `(height, width)` of the patch grid, e.g. `outputs.grid_size`.
        centers: `(num_tokens,)` patch index of each token's centre, e.g. `outputs.centers[i]` (-1 entries are
            padding); without it, a token's largest piece stands for its centre.
        alpha: opacity of the token colours, between 0 (image only) and 1 (colours only).
        mark_tokens: write each token's index on every piece of its region, circled at its centre.

    Returns:
        A new RGB image of the same size as `image`, with a legend box in the top-left corner.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha}")
    rgb = image.convert("RGB")
    labels = patch_labels(assignment, grid_size)
    label_map = token_label_map(labels.ravel(), grid_size, (rgb.height, rgb.width))
    labelled = label_map >= 0

    pixels = np.asarray(rgb, dtype=np.float64)
    palette = token_palette(int(labels.max()) + 1)
    pixels[labelled] = (1.0 - alpha) * pixels[labelled] + alpha * palette[label_map[labelled]].astype(np.float64)
    pixels = np.round(pixels).astype(np.uint8)
    pixels[region_boundaries(label_map)] = BOUNDARY_COLOR
    picture = Image.fromarray(pixels)
    if mark_tokens:
        centers = None if centers is None else np.asarray(torch.as_tensor(centers).detach().cpu())
        picture = draw_token_marks(picture, labels, centers, palette)

    num_tokens = len(np.unique(labels[labels >= 0]))
    return draw_legend(picture, num_tokens)


__all__ = ["draw_token_regions", "token_label_map", "token_palette"]
