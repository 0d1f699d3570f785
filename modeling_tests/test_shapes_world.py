"""The shapes world: deterministic from a seed, and every record true of its scene.

Answers, referring expressions and edits are checked against interpreters written here from the scene
descriptions alone, not against the generator's own helpers.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from transformers_setok import render_scene, scene_from_description, shapes_world
from transformers_setok.scene_reader import shows_prompt
from transformers_setok.shapes_world import (
    GAP,
    MAX_OBJECTS,
    PALETTE,
    SHAPES,
    SIZES,
    fits,
    parse_prompt,
    scene_for_prompt,
)

NUM_SCENES = 60


@pytest.fixture(scope="module")
def world():
    return shapes_world(seed=7, num_scenes=NUM_SCENES)


def boxes(scene: dict) -> list[tuple[float, float, float, float]]:
    result = []
    for item in scene["objects"]:
        half_width = item["scale"] / 2
        half_height = half_width / 3 if item["shape"] == "bar" else half_width
        x, y = item["centre"]
        result.append((x - half_width, y - half_height, x + half_width, y + half_height))
    return result


def holds(relation: str, a: tuple, b: tuple) -> bool:
    return {"left of": a[2] <= b[0], "right of": a[0] >= b[2], "above": a[3] <= b[1], "below": a[1] >= b[3]}[relation]


def matching(scene: dict, phrase: str) -> list[int]:
    """Indices of the objects a noun phrase ("red circle", "circle", "red shape", "large red circle",
    "shape left of the blue square") describes."""
    relational = re.fullmatch(r"shape (left of|right of|above|below) the (.+)", phrase)
    if relational:
        (anchor,) = matching(scene, relational[2])
        frames = boxes(scene)
        return [i for i in range(len(frames)) if holds(relational[1], frames[i], frames[anchor])]
    words = phrase.split()
    result = []
    for index, item in enumerate(scene["objects"]):
        attributes = {item["colour"], item["size"], item["shape"], "shape", "object"}
        if set(words) <= attributes and (words[-1] in (item["shape"], "shape", "object")):
            result.append(index)
    return result


def answer(scene: dict, question: str) -> str:
    objects = scene["objects"]
    if match := re.fullmatch(r"What colour is the (.+)\?", question):
        (index,) = matching(scene, match[1])
        return objects[index]["colour"]
    if match := re.fullmatch(r"What shape is the (.+)\?", question):
        (index,) = matching(scene, match[1])
        return objects[index]["shape"]
    if match := re.fullmatch(r"How many (.+?)s are there\?", question):
        return str(len(matching(scene, match[1])))
    if match := re.fullmatch(r"Is there an? (.+)\?", question):
        return "yes" if matching(scene, match[1]) else "no"
    if match := re.fullmatch(r"Is the (.+) (left of|right of|above|below) the (.+)\?", question):
        (a,), (b,) = matching(scene, match[1]), matching(scene, match[3])
        frames = boxes(scene)
        return "yes" if holds(match[2], frames[a], frames[b]) else "no"
    match = re.fullmatch(r"Is the (\w+) (\w+)\?", question)
    (index,) = matching(scene, match[1])
    return "yes" if objects[index]["colour"] == match[2] else "no"


def test_same_seed_same_world_and_scenes_do_not_depend_on_the_count(world) -> None:
    again = shapes_world(seed=7, num_scenes=NUM_SCENES)
    prefix = shapes_world(seed=7, num_scenes=5)
    for task in world:
        columns = [name for name in world[task].column_names if name not in ("image", "source_image")]
        assert world[task].select_columns(columns).to_list() == again[task].select_columns(columns).to_list()
    assert [np.asarray(image).tolist() for image in prefix["captions"]["image"]] == [
        np.asarray(image).tolist() for image in world["captions"]["image"][:5]
    ]
    assert prefix["questions"].to_list()[-1]["scene_id"] == "7-4"


def test_another_seed_gives_other_scenes(world) -> None:
    other = shapes_world(seed=8, num_scenes=NUM_SCENES, tasks=["captions"])
    mine = {repr(scene) for scene in world["captions"]["scene"]}
    assert not mine & {repr(scene) for scene in other["captions"]["scene"]}
    assert not set(world["captions"]["scene_id"]) & set(other["captions"]["scene_id"])


def test_scenes_are_drawn_as_described(world) -> None:
    counts = Counter()
    for record in world["captions"]:
        scene, pixels, labels = record["scene"], np.asarray(record["image"]), np.asarray(record["instance_map"])
        objects = scene["objects"]
        counts[len(objects)] += 1
        assert 1 <= len(objects) <= MAX_OBJECTS
        assert all(item["shape"] in SHAPES and item["colour"] in PALETTE for item in objects)
        assert all(SIZES[item["size"]][0] <= item["scale"] <= SIZES[item["size"]][1] for item in objects)
        assert (pixels[labels == 0] == scene["background"]).all()
        assert min(scene["background"]) >= 220  # light
        for index, item in enumerate(objects):
            ys, xs = np.nonzero(labels == index + 1)
            assert (pixels[labels == index + 1] == PALETTE[item["colour"]]).all()
            assert item["bbox"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        frames = boxes(scene)
        for i in range(len(frames)):
            for j in range(i):
                a, b = frames[i], frames[j]
                assert a[2] + GAP <= b[0] or b[2] + GAP <= a[0] or a[3] + GAP <= b[1] or b[3] + GAP <= a[1]
        named = re.findall(r"(small|large) (\w+) (\w+)", record["caption"])
        assert named == [(o["size"], o["colour"], o["shape"]) for o in objects]
        assert all(f"{o['colour']} {o['shape']}" in record["concepts"] for o in objects)
    assert set(counts) == set(range(1, MAX_OBJECTS + 1))


def test_every_answer_is_true_of_its_scene(world) -> None:
    scenes = dict(zip(world["captions"]["scene_id"], world["captions"]["scene"]))
    questions = world["questions"].remove_columns("image")
    assert set(questions["kind"]) == {"colour", "shape", "count", "position", "existence", "attribute"}
    for record in questions:
        assert answer(scenes[record["scene_id"]], record["question"]) == record["answer"], record


def test_every_referring_expression_names_exactly_its_object_and_mask(world) -> None:
    maps = dict(zip(world["captions"]["scene_id"], world["captions"]["instance_map"]))
    scenes = dict(zip(world["captions"]["scene_id"], world["captions"]["scene"]))
    assert len(world["referring"]) > NUM_SCENES
    for record in world["referring"]:
        assert matching(scenes[record["scene_id"]], record["expression"].removeprefix("the ")) == [
            record["object_index"]
        ], record["expression"]
        mask = np.asarray(record["mask"])
        assert mask.dtype == bool
        assert (mask == (np.asarray(maps[record["scene_id"]]) == record["object_index"] + 1)).all()


def test_edits_change_the_description_as_instructed_and_render_from_it(world) -> None:
    assert set(world["editing"]["operation"]) == {"recolour", "remove", "add", "move"}
    for record in world["editing"]:
        source, edited = record["source_scene"]["objects"], record["edited_scene"]["objects"]
        words = record["instruction"].split()
        kind = lambda item: (item["colour"], item["shape"])  # noqa: E731
        if record["operation"] == "add":
            assert edited[:-1] == source and kind(edited[-1]) == (words[2], words[3])
        else:
            (index,) = [i for i, item in enumerate(source) if kind(item) == (words[2], words[3])]
            rest = source[:index] + source[index + 1 :]
            if record["operation"] == "remove":
                assert edited == rest
            else:
                assert edited[:index] + edited[index + 1 :] == rest
                changed = edited[index]
                if record["operation"] == "recolour":
                    assert kind(changed) == (words[4], words[3]) and changed["centre"] == source[index]["centre"]
                else:
                    step = np.subtract(changed["centre"], source[index]["centre"])
                    direction = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[words[4]]
                    np.testing.assert_allclose(step, np.multiply(direction, 0.25), atol=1e-9)
        for scene, image in (
            (record["edited_scene"], record["edited_image"]),
            (record["source_scene"], record["source_image"]),
        ):
            assert (np.asarray(render_scene(scene_from_description(scene)).image) == np.asarray(image)).all()


def test_text_to_image_prompts_name_every_object(world) -> None:
    for prompt, scene in zip(world["text_to_image"]["prompt"], world["captions"]["scene"]):
        assert parse_prompt(prompt) == Counter((o["colour"], o["shape"]) for o in scene["objects"])


def test_image_size_is_configurable() -> None:
    world = shapes_world(seed=0, num_scenes=2, image_size=96, tasks=["referring", "editing"])
    assert set(world) == {"referring", "editing"}
    assert world["referring"][0]["image"].size == (96, 96)
    assert np.asarray(world["referring"][0]["mask"]).shape == (96, 96)
    assert world["editing"][0]["edited_image"].size == (96, 96)


@pytest.mark.parametrize(
    ("kwargs", "error", "names"),
    [
        ({"num_scenes": 0}, ValueError, "num_scenes"),
        ({"image_size": 8}, ValueError, "image_size"),
        ({"tasks": ["captions", "vqa"]}, ValueError, "tasks"),
        ({"seed": "0"}, TypeError, "seed"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, error: type, names: str) -> None:
    with pytest.raises(error, match=names):
        shapes_world(**{"num_scenes": 1, **kwargs})


def test_bad_descriptions_are_named() -> None:
    good = {
        "background": [240, 240, 240],
        "objects": [{"shape": "circle", "colour": "red", "scale": 0.3, "centre": [0.5, 0.5]}],
    }
    assert len(scene_from_description(good).objects) == 1
    with pytest.raises(ValueError, match=r"\['shape'\]"):
        scene_from_description({**good, "objects": [{**good["objects"][0], "shape": "star"}]})
    with pytest.raises(ValueError, match=r"\['colour'\]"):
        scene_from_description({**good, "objects": [{**good["objects"][0], "colour": "pink"}]})
    with pytest.raises(ValueError, match="background"):
        scene_from_description({"objects": []})


def test_a_text_to_image_prompt_has_one_picture_showing_what_it_names(world) -> None:
    for record in world["text_to_image"]:
        scene = scene_for_prompt(record["prompt"])
        assert Counter((o.colour, o.shape) for o in scene.objects) == parse_prompt(record["prompt"])
        assert all(fits(item, scene.objects[:index]) for index, item in enumerate(scene.objects))
        assert (np.asarray(record["image"]) == np.asarray(render_scene(scene).image)).all()
        assert shows_prompt(record["image"], record["prompt"])
    with pytest.raises(ValueError, match="prompt"):
        scene_for_prompt("a pink cloud")
