"""The scene reader reads the world's renders, clean and degraded, and judges prompts and edits."""

from __future__ import annotations

import random
from collections import Counter, deque
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image, ImageFilter

from transformers_setok import edit_applied, read_scene, render_scene, shapes_world, shows_prompt
from transformers_setok.scene_reader import connected_components
from transformers_setok.shapes_world import Scene, SceneObject, sample_scene

NUM_SCENES = 300


def degrade(image: Image.Image, seed: int, blur: float = 0.8, noise: float = 8.0) -> np.ndarray:
    blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(blur)), dtype=np.float64)
    noisy = blurred + np.random.default_rng(seed).normal(0, noise, blurred.shape)
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def fraction_read(degraded: bool) -> float:
    """The fraction of objects read with their colour and shape, extra objects counted against it."""
    right = total = 0
    for index in range(NUM_SCENES):
        scene = sample_scene(random.Random(f"reader-test/{index}"))
        image = render_scene(scene).image
        read = read_scene(degrade(image, index) if degraded else image)
        truth, seen = Counter(o.name for o in scene.objects), Counter(o.name for o in read)
        right += sum((truth & seen).values())
        total += max(sum(truth.values()), sum(seen.values()))
    return right / total


def test_reads_the_worlds_own_renders() -> None:
    assert fraction_read(degraded=False) >= 0.98


def test_reads_blurred_and_noisy_renders() -> None:
    assert fraction_read(degraded=True) >= 0.98


def test_finds_each_object_where_it_was_drawn() -> None:
    scene = Scene(
        (235, 240, 228),
        (
            SceneObject("bar", "yellow", 0.34, (0.3, 0.2)),
            SceneObject("diamond", "purple", 0.3, (0.75, 0.7)),
            SceneObject("triangle", "orange", 0.22, (0.25, 0.7)),
        ),
    )
    rendered = render_scene(scene, 128)
    read = read_scene(rendered.image)
    assert [item.name for item in read] == ["yellow bar", "purple diamond", "orange triangle"]  # by top edge
    assert [item.bbox for item in read] == rendered.bboxes()
    for item, mask in zip(read, rendered.masks):
        ys, xs = np.nonzero(mask)
        np.testing.assert_allclose(item.centre, ((xs.mean() + 0.5) / 128, (ys.mean() + 0.5) / 128))
    assert read_scene(np.asarray(rendered.image) / 255.0) == read


def bfs_components(mask: np.ndarray) -> list[frozenset]:
    """4-connected regions by breadth-first search, as sets of pixels."""
    seen, regions = np.zeros_like(mask), []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        region, queue = set(), deque([start])
        seen[start] = True
        while queue:
            y, x = queue.popleft()
            region.add((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        regions.append(frozenset(region))
    return regions


@pytest.mark.parametrize("seed", range(3))
def test_connected_components_match_a_breadth_first_search(seed: int) -> None:
    mask = np.random.default_rng(seed).random((23, 31)) < 0.55
    labels = connected_components(mask)
    found = {frozenset(zip(*np.nonzero(labels == label))) for label in range(1, labels.max() + 1)}
    assert found == set(bfs_components(mask))
    assert (labels[~mask] == 0).all()


def test_shows_prompt_needs_every_named_object() -> None:
    scene = Scene(
        (240, 240, 240),
        (
            SceneObject("circle", "red", 0.3, (0.25, 0.25)),
            SceneObject("circle", "red", 0.22, (0.75, 0.25)),
            SceneObject("square", "blue", 0.3, (0.5, 0.75)),
        ),
    )
    image = render_scene(scene).image
    assert shows_prompt(image, "two red circles and a blue square")
    assert shows_prompt(image, "a blue square")  # extra objects are allowed
    assert not shows_prompt(image, "three red circles and a blue square")
    assert not shows_prompt(image, "two red circles and a green square")
    with pytest.raises(ValueError, match="prompt"):
        shows_prompt(image, "a cat on a mat")


def test_every_generated_edit_is_judged_applied_and_wrong_edits_are_not() -> None:
    world = shapes_world(seed=11, num_scenes=40, tasks=["editing"])["editing"]
    for record in world:
        source, edited, instruction = record["source_image"], record["edited_image"], record["instruction"]
        assert edit_applied(source, edited, instruction), instruction
        assert edit_applied(degrade(source, 0), degrade(edited, 1), instruction), instruction
        assert not edit_applied(source, source, instruction), instruction


def test_edits_that_touch_the_rest_or_miss_the_target_fail() -> None:
    red, blue = SceneObject("circle", "red", 0.3, (0.25, 0.25)), SceneObject("square", "blue", 0.3, (0.7, 0.7))
    source = render_scene(Scene((240, 240, 240), (red, blue))).image

    def draw(*objects: SceneObject) -> Image.Image:
        return render_scene(Scene((240, 240, 240), objects)).image

    assert edit_applied(source, draw(replace(red, colour="green"), blue), "make the red circle green")
    assert not edit_applied(source, draw(red, replace(blue, colour="green")), "make the red circle green")
    assert not edit_applied(
        source, draw(replace(red, colour="green"), replace(blue, centre=(0.7, 0.3))), "make the red circle green"
    )
    assert edit_applied(source, draw(blue), "remove the red circle")
    assert not edit_applied(source, draw(red), "remove the red circle")
    assert edit_applied(source, draw(replace(red, centre=(0.25, 0.5)), blue), "move the red circle down")
    assert not edit_applied(source, draw(replace(red, centre=(0.5, 0.25)), blue), "move the red circle down")
    assert edit_applied(source, draw(red, blue, SceneObject("bar", "yellow", 0.3, (0.7, 0.2))), "add a yellow bar")
    assert not edit_applied(source, draw(red, blue, SceneObject("bar", "orange", 0.3, (0.7, 0.2))), "add a yellow bar")
    with pytest.raises(ValueError, match="instruction"):
        edit_applied(source, source, "paint it black")


def test_bad_images_are_named() -> None:
    with pytest.raises(ValueError, match="image"):
        read_scene(np.zeros((8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"image.*\[0, 1\]"):
        read_scene(np.full((8, 8, 3), 2.0))
    with pytest.raises(ValueError, match=r"image.*\[0, 255\]"):
        read_scene(np.full((8, 8, 3), 300))
    with pytest.raises(TypeError, match="image"):
        read_scene([[0, 0, 0]])
