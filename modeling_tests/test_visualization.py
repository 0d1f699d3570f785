"""Token-region overlays: colours, untouched pixels, boundaries and the legend, checked pixel by pixel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from transformers_setok.visualization import (
    BOUNDARY_COLOR,
    MARK_TEXT,
    draw_token_regions,
    token_label_map,
    token_palette,
    token_pieces,
)

GREY = (128, 128, 128)


def grey_image(width: int = 96, height: int = 64) -> Image.Image:
    return Image.new("RGB", (width, height), GREY)


def two_halves(grid: tuple[int, int] = (4, 6)) -> np.ndarray:
    """Token 0 on the left half of the grid, token 1 on the right."""
    labels = np.zeros(grid, dtype=np.int64)
    labels[:, grid[1] // 2 :] = 1
    return labels.ravel()


def test_label_map_upsamples_by_nearest_patch() -> None:
    assignment = torch.tensor([0, 1, 2, 3])
    label_map = token_label_map(assignment, (2, 2), (4, 6))
    expected = np.array([[0, 0, 0, 1, 1, 1]] * 2 + [[2, 2, 2, 3, 3, 3]] * 2)
    np.testing.assert_array_equal(label_map, expected)


def test_overlay_keeps_size_and_blends_token_colours() -> None:
    image = grey_image()
    overlay = np.asarray(draw_token_regions(image, two_halves(), (4, 6), alpha=0.5))
    assert overlay.shape == (64, 96, 3)

    palette = token_palette(2).astype(np.float64)
    # Pixels deep inside each half, below the legend box.
    expected_left = np.round(0.5 * np.array(GREY) + 0.5 * palette[0])
    expected_right = np.round(0.5 * np.array(GREY) + 0.5 * palette[1])
    np.testing.assert_array_equal(overlay[50, 20], expected_left)
    np.testing.assert_array_equal(overlay[50, 80], expected_right)


def test_unassigned_patches_keep_their_pixels() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(64, 96, 3), dtype=np.uint8)
    assignment = two_halves()
    assignment[18:24] = -1  # the whole bottom patch row
    overlay = np.asarray(draw_token_regions(Image.fromarray(pixels), assignment, (4, 6)))
    # The bottom row covers pixel rows 48..63; row 48 borders the tokens above, so it holds the boundary line.
    np.testing.assert_array_equal(overlay[49:], pixels[49:])
    assert not np.array_equal(overlay[20:40, 10:40], pixels[20:40, 10:40])


def test_distinct_tokens_get_distinct_colours() -> None:
    palette = token_palette(32)
    assert len({tuple(color) for color in palette}) == 32
    # Consecutive tokens, the usual neighbours on an image, are far apart in colour.
    steps = np.abs(np.diff(palette.astype(np.int64), axis=0)).sum(axis=1)
    assert steps.min() > 60
    np.testing.assert_array_equal(token_palette(5), palette[:5])


def test_boundaries_drawn_where_labels_change() -> None:
    overlay = np.asarray(draw_token_regions(grey_image(), two_halves(), (4, 6)))
    # The two halves meet between pixel columns 47 and 48: both sides get the line, all the way down.
    assert (overlay[30:, 47] == BOUNDARY_COLOR).all()
    assert (overlay[30:, 48] == BOUNDARY_COLOR).all()
    assert not (overlay[30:, 40] == BOUNDARY_COLOR).all(axis=-1).any()
    assert not (overlay[30:, 56] == BOUNDARY_COLOR).all(axis=-1).any()


def test_legend_box_sits_top_left_and_grows_with_the_count() -> None:
    image = grey_image(256, 256)
    one = np.asarray(draw_token_regions(image, np.zeros(256, dtype=np.int64), (16, 16), alpha=0.0, mark_tokens=False))
    # Twelve tokens, the extra eleven along the bottom patch row, far from the legend.
    labels = np.zeros((16, 16), dtype=np.int64)
    labels[15, 5:] = np.arange(1, 12)
    many = np.asarray(draw_token_regions(image, labels.ravel(), (16, 16), alpha=0.0, mark_tokens=False))

    def legend_box(overlay: np.ndarray) -> tuple[int, int]:
        """Rows and columns of the top-left corner that differ from the plain image (the legend)."""
        changed = (overlay[:64, :128] != GREY).any(axis=-1)
        return int(changed.any(axis=1).sum()), int(changed.any(axis=0).sum())

    one_height, one_width = legend_box(one)
    many_height, many_width = legend_box(many)
    assert one_height > 10 and one_width > 30
    assert many_height == one_height
    # "12 tokens" is a longer text than "1 token".
    assert many_width > one_width
    # White text on a dark box.
    assert (one[:64, :128] > 240).all(axis=-1).any()
    assert (one[:64, :128] < 80).all(axis=-1).any()
    # Away from the legend, alpha=0 and a single token leave the image untouched.
    np.testing.assert_array_equal(one[64:], np.asarray(image)[64:])


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="assignment must have shape \\(24,\\)"):
        draw_token_regions(grey_image(), np.zeros(10, dtype=np.int64), (4, 6))
    with pytest.raises(TypeError, match="integer"):
        draw_token_regions(grey_image(), np.zeros(24), (4, 6))
    with pytest.raises(ValueError, match="alpha"):
        draw_token_regions(grey_image(), two_halves(), (4, 6), alpha=1.5)


def scattered_token() -> np.ndarray:
    """An 8x8 grid: token 0 everywhere but token 1 in two 2x2 blocks and one stray patch, far from the legend."""
    labels = np.zeros((8, 8), dtype=np.int64)
    labels[5:7, 1:3] = 1
    labels[5:7, 5:7] = 1
    labels[3, 7] = 1
    return labels


def test_pieces_are_the_connected_parts_of_each_token() -> None:
    pieces = sorted((token, sorted(patches)) for token, patches in token_pieces(scattered_token()))
    assert [(token, len(patches)) for token, patches in pieces] == [(0, 55), (1, 1), (1, 4), (1, 4)]
    assert pieces[1][1] == [(3, 7)] and pieces[2][1] == [(5, 1), (5, 2), (6, 1), (6, 2)]
    ring = np.ones((5, 5), dtype=np.int64)
    ring[1:4, 1:4] = 0
    ring[2, 2] = -1  # a patch of no token belongs to no piece
    assert sorted(len(patches) for _, patches in token_pieces(ring)) == [8, 16]


def test_every_piece_is_numbered_and_the_centre_circled() -> None:
    image = grey_image(256, 256)  # 32 px per patch
    labels = scattered_token()
    centre = 6 * 8 + 6  # patch (6, 6), in the right-hand block
    overlay = np.asarray(draw_token_regions(image, labels.ravel(), (8, 8), centers=[0, centre], alpha=0.0))
    plain = np.asarray(draw_token_regions(image, labels.ravel(), (8, 8), alpha=0.0, mark_tokens=False))
    token_one = token_palette(2)[1]

    def has(pixels: np.ndarray, color: np.ndarray) -> bool:
        return bool((pixels == color).all(axis=-1).any())

    centre_cell = overlay[6 * 32 : 7 * 32, 6 * 32 : 7 * 32]
    assert has(centre_cell, token_one) and has(centre_cell, MARK_TEXT)  # a circle in the token's colour, numbered
    left_block = overlay[5 * 32 : 7 * 32, 1 * 32 : 3 * 32]
    assert has(left_block, MARK_TEXT) and not has(left_block, token_one)  # numbered, not circled
    # Below the legend and the circle of token 0 (its centre is patch 0), only the two marks of token 1 change
    # pixels; the stray single patch (3, 7) is not numbered.
    changed = (overlay != plain).any(axis=-1)
    near_marks = np.zeros_like(changed)
    near_marks[5 * 32 - 4 : 7 * 32 + 4, 1 * 32 - 4 : 3 * 32 + 4] = True
    near_marks[6 * 32 - 4 : 7 * 32 + 4, 6 * 32 - 4 : 7 * 32 + 4] = True
    assert changed[64:].any() and not (changed & ~near_marks)[64:].any()

    # Without centres, a token's largest piece holds the circle.
    labels[7, 1:3] = 1  # the left block grows to six patches
    default = np.asarray(draw_token_regions(image, labels.ravel(), (8, 8), alpha=0.0))
    assert has(default[5 * 32 : 8 * 32, 1 * 32 : 3 * 32], token_one)
    assert not has(default[5 * 32 : 7 * 32, 5 * 32 : 7 * 32], token_one)
