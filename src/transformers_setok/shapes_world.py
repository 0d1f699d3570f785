"""The shapes world: a small synthetic world, generated from a seed, to train and evaluate SeTok and Setokim on.

Nothing can be downloaded here, so the project makes its own data: scenes of 1 to 5 coloured shapes on a plain
light background, drawn with PIL, with everything a model is asked about known exactly. The same seed gives the
same datasets on every machine; different seeds give independent scenes (`shapes_world(seed=0)` to train,
`shapes_world(seed=1)` as the held-out split). Scene `i` of a seed does not depend on `num_scenes`, so a small
run is a prefix of a big one.

A scene (`Scene`) is a background colour and a tuple of `SceneObject`s: `shape` (one of `SHAPES`), `colour`
(a `PALETTE` name), `scale` (the object's width as a fraction of the image side; a bar is a third as tall as it is
wide, every other shape as tall as wide) and `centre` (`(x, y)` as fractions of the image side, `y` downwards).
The description is independent of the resolution: `render_scene(scene, image_size)` draws it at any size, and
objects never overlap (their boxes keep a gap of `GAP`), so each object's mask is exact.

`shapes_world(seed, num_scenes, image_size)` returns a `datasets.DatasetDict` with one dataset per task. Images
are `datasets.Image()` features (RGB), masks are images too (`mode "1"`, so `np.array(mask)` is boolean):

- `captions` (one record per scene): `scene_id`, `image`, `caption` ("Two shapes on a light background: a
  large red circle and a small blue bar."), `concepts` (the phrases the image shows: "red circle", "circle",
  "red", ...), `scene` (the description: `background` and `objects`, each object with `shape`, `colour`, `size`
  ("small"/"large"), `scale`, `centre` and its pixel `bbox` `[x0, y0, x1, y1)`) and `instance_map` (mode "L":
  0 is the background, `i + 1` is object `i`).
- `questions` (up to six per scene): `scene_id`, `image`, `question`, `answer` (one word or a number in
  digits) and `kind`: "colour", "shape", "count", "position" (left of, right of, above, below), "existence" or
  "attribute" (a yes/no question about an object's colour).
- `referring` (one record per object that some expression picks out): `scene_id`, `image`, `expression`
  ("the red circle", "the shape left of the blue square"; it always names exactly one object), `mask` and
  `object_index`.
- `editing` (one record per scene): `scene_id`, `instruction` ("make the red circle blue", "remove the red
  circle", "add a green triangle", "move the red circle left"), `operation`, `source_image`, `edited_image`,
  `source_scene` and `edited_scene`. The edited image is rendered from the edited description.
- `text_to_image` (one record per scene): `scene_id`, `prompt` ("two red circles and a blue square": every
  object, grouped by kind) and `image`, the prompt's one picture (`scene_for_prompt`): its objects in the
  prompt's order on fixed slots, at one size, on one background. A free layout would make a prompt stand for
  countless images, and a model that regresses image tokens (Setokim's vision head) learns their mean, which
  shows no scene at all; a prompt with one picture keeps text-to-image a function a tiny model can learn.

Spatial relations are strict: A is left of B when A's box ends before B's begins, so a relation is either
clearly true, clearly false, or not asked about. `parse_prompt` and `Edit.parse` read prompts and instructions
back, which is how the scene reader (`scene_reader.py`) checks generated and edited images.
"""

from __future__ import annotations

import io
import random
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

import datasets
import numpy as np
from PIL import Image, ImageDraw

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 135, 20),
    "yellow": (235, 195, 20),
    "green": (40, 160, 70),
    "blue": (40, 85, 220),
    "purple": (145, 60, 185),
}
SHAPES = ("circle", "square", "triangle", "diamond", "bar")
SIZES: dict[str, tuple[float, float]] = {"small": (0.2, 0.25), "large": (0.3, 0.36)}
BACKGROUND_RANGE = (222, 250)  # every background channel lies here: plain and light, far from the palette
MAX_OBJECTS = 5
MARGIN = 0.02  # free border around the image, as a fraction of its side
GAP = 0.05  # free space between two objects' boxes
MOVE_STEP = 0.25  # how far a "move" edit shifts an object
PLACEMENT_ATTEMPTS = 200
TASKS = ("captions", "questions", "referring", "editing", "text_to_image")
NUMBER_WORDS = ("no", "one", "two", "three", "four", "five")
OPPOSITES = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
RELATIONS = tuple(OPPOSITES)
DIRECTIONS: dict[str, tuple[float, float]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
PROMPT_SCALE = 0.24  # every object of a prompt's picture is this wide
PROMPT_BACKGROUND = (236, 236, 236)
PROMPT_SLOTS: dict[int, tuple[tuple[float, float], ...]] = {  # object centres of a prompt's picture, by count
    1: ((0.5, 0.5),),
    2: ((0.28, 0.5), (0.72, 0.5)),
    3: ((0.2, 0.5), (0.5, 0.5), (0.8, 0.5)),
    4: ((0.28, 0.28), (0.72, 0.28), (0.28, 0.72), (0.72, 0.72)),
    5: ((0.2, 0.28), (0.5, 0.28), (0.8, 0.28), (0.28, 0.72), (0.72, 0.72)),
}


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    scale: float
    centre: tuple[float, float]

    @property
    def size(self) -> str:
        return "small" if self.scale <= SIZES["small"][1] else "large"

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    def box(self) -> tuple[float, float, float, float]:
        """`(x0, y0, x1, y1)` as fractions of the image side."""
        half_width = self.scale / 2
        half_height = half_width / 3 if self.shape == "bar" else half_width
        x, y = self.centre
        return (x - half_width, y - half_height, x + half_width, y + half_height)


@dataclass(frozen=True)
class Scene:
    background: tuple[int, int, int]
    objects: tuple[SceneObject, ...]

    def describe(self, bboxes: Iterable[Iterable[int]] | None = None) -> dict:
        """The description as plain data (what the datasets store); `scene_from_description` reads it back."""
        objects = [
            {"shape": o.shape, "colour": o.colour, "size": o.size, "scale": o.scale, "centre": list(o.centre)}
            for o in self.objects
        ]
        if bboxes is not None:
            for description, bbox in zip(objects, bboxes):
                description["bbox"] = list(bbox)
        return {"background": list(self.background), "objects": objects}


@dataclass
class RenderedScene:
    image: Image.Image
    instance_map: np.ndarray  # (image_size, image_size) uint8: 0 background, i + 1 object i
    num_objects: int

    @property
    def masks(self) -> np.ndarray:
        """`(num_objects, image_size, image_size)` boolean masks, one per object."""
        return self.instance_map[None] == np.arange(1, self.num_objects + 1)[:, None, None]

    def bboxes(self) -> list[tuple[int, int, int, int]]:
        """Each object's pixel box `(x0, y0, x1, y1)`, ends exclusive (`Image.crop` convention); an object
        drawn over by later ones, so that none of it shows, has the box `(0, 0, 0, 0)`."""
        boxes = []
        for mask in self.masks:
            ys, xs = np.nonzero(mask)
            boxes.append(
                (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1) if xs.size else (0, 0, 0, 0)
            )
        return boxes


def scene_from_description(description: Mapping) -> Scene:
    """A `Scene` from its description (a record's `scene`, `source_scene` or `edited_scene`, or your own).

    Objects need `shape`, `colour`, `scale` and `centre`; `size` and `bbox`, when present, are derived from
    those and recomputed on rendering.
    """
    try:
        background, objects = description["background"], description["objects"]
    except (KeyError, TypeError) as error:
        raise ValueError("`description` must be a mapping with 'background' and 'objects'") from error
    background = tuple(int(channel) for channel in background)
    if len(background) != 3 or not all(0 <= channel <= 255 for channel in background):
        raise ValueError(f"`description['background']` must be three values in [0, 255], got {background}")
    parsed = []
    for index, item in enumerate(objects):
        where = f"`description['objects'][{index}]`"
        if item.get("shape") not in SHAPES:
            raise ValueError(f"{where}['shape'] must be one of {SHAPES}, got {item.get('shape')!r}")
        if item.get("colour") not in PALETTE:
            raise ValueError(f"{where}['colour'] must be one of {tuple(PALETTE)}, got {item.get('colour')!r}")
        scale, centre = float(item["scale"]), tuple(float(value) for value in item["centre"])
        if not 0 < scale <= 1 or len(centre) != 2:
            raise ValueError(f"{where} needs a scale in (0, 1] and a centre (x, y), got {scale} and {centre}")
        parsed.append(SceneObject(item["shape"], item["colour"], scale, centre))
    return Scene(background, tuple(parsed))


def shape_outline(shape: str, box: tuple[float, float, float, float]) -> list[tuple[float, float]]:
    """The polygon of a non-circle shape inside its pixel box (a triangle points up, a diamond is a square on
    its corner)."""
    x0, y0, x1, y1 = box
    xc, yc = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "triangle":
        return [(xc, y0), (x1, y1), (x0, y1)]
    if shape == "diamond":
        return [(xc, y0), (x1, yc), (xc, y1), (x0, yc)]
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def render_scene(scene: Scene, image_size: int = 64) -> RenderedScene:
    """Draws a scene: its image and its instance map (each object's exact mask). The world's objects never
    overlap; in a description of your own, later objects are drawn over earlier ones."""
    if not isinstance(image_size, int) or image_size < 16:
        raise ValueError(f"`image_size` must be an integer of at least 16, got {image_size!r}")
    labels = Image.new("L", (image_size, image_size), 0)
    draw = ImageDraw.Draw(labels)
    for index, item in enumerate(scene.objects, start=1):
        x0, y0, x1, y1 = item.box()
        box = (x0 * image_size, y0 * image_size, x1 * image_size - 1, y1 * image_size - 1)
        if item.shape == "circle":
            draw.ellipse(box, fill=index)
        else:
            draw.polygon(shape_outline(item.shape, box), fill=index)
    instance_map = np.asarray(labels)
    colours = np.array([scene.background, *(PALETTE[item.colour] for item in scene.objects)], dtype=np.uint8)
    return RenderedScene(Image.fromarray(colours[instance_map]), instance_map, len(scene.objects))


def fits(candidate: SceneObject, others: Iterable[SceneObject]) -> bool:
    """Whether an object lies inside the image margin and keeps a gap of `GAP` to every other object."""
    x0, y0, x1, y1 = candidate.box()
    if x0 < MARGIN or y0 < MARGIN or x1 > 1 - MARGIN or y1 > 1 - MARGIN:
        return False
    for other in others:
        ox0, oy0, ox1, oy1 = other.box()
        if x0 < ox1 + GAP and ox0 < x1 + GAP and y0 < oy1 + GAP and oy0 < y1 + GAP:
            return False
    return True


def place(rng: random.Random, shape: str, colour: str, others: tuple[SceneObject, ...]) -> SceneObject | None:
    """An object of this kind at a random size and free position, or None when none was found."""
    for _ in range(PLACEMENT_ATTEMPTS):
        scale = round(rng.uniform(*SIZES[rng.choice(tuple(SIZES))]), 3)
        centre = (round(rng.uniform(0, 1), 3), round(rng.uniform(0, 1), 3))
        candidate = SceneObject(shape, colour, scale, centre)
        if fits(candidate, others):
            return candidate
    return None


def sample_scene(rng: random.Random) -> Scene:
    """A random scene: 1 to `MAX_OBJECTS` objects (fewer only when no free place is left)."""
    background = tuple(rng.randint(*BACKGROUND_RANGE) for _ in range(3))
    objects: tuple[SceneObject, ...] = ()
    for _ in range(rng.randint(1, MAX_OBJECTS)):
        placed = place(rng, rng.choice(SHAPES), rng.choice(tuple(PALETTE)), objects)
        if placed is not None:
            objects += (placed,)
    return Scene(background, objects)


def related(first: SceneObject, second: SceneObject, relation: str) -> bool:
    """Strict spatial relations: `first`'s box lies wholly to that side of `second`'s."""
    ax0, ay0, ax1, ay1 = first.box()
    bx0, by0, bx1, by1 = second.box()
    return {"left of": ax1 <= bx0, "right of": ax0 >= bx1, "above": ay1 <= by0, "below": ay0 >= by1}[relation]


def plural(shape: str, count: int) -> str:
    return shape if count == 1 else f"{shape}s"


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else f"{', '.join(phrases[:-1])} and {phrases[-1]}"


def prompt_for(scene: Scene) -> str:
    """Names every object, grouped by kind in order of appearance: "two red circles and a blue square"."""
    counts = Counter((item.colour, item.shape) for item in scene.objects)
    phrases = []
    for (colour, shape), count in counts.items():
        quantity = article(colour) if count == 1 else NUMBER_WORDS[count]
        phrases.append(f"{quantity} {colour} {plural(shape, count)}")
    return join(phrases)


PROMPT_PHRASE = re.compile(rf"\b(an?|one|two|three|four|five) ({'|'.join(PALETTE)}) ({'|'.join(SHAPES)})s?\b")


def parse_prompt(prompt: str) -> Counter:
    """The `(colour, shape)` counts a prompt written like `prompt_for`'s names."""
    counts: Counter = Counter()
    for quantity, colour, shape in PROMPT_PHRASE.findall(prompt.lower()):
        counts[(colour, shape)] += 1 if quantity in ("a", "an") else NUMBER_WORDS.index(quantity)
    return counts


def scene_for_prompt(prompt: str) -> Scene:
    """The one picture of a text-to-image prompt: the objects it names, in its order, on `PROMPT_SLOTS`."""
    names = [name for name, count in parse_prompt(prompt).items() for _ in range(count)]
    if not 1 <= len(names) <= MAX_OBJECTS:
        raise ValueError(f"`prompt` must name 1 to {MAX_OBJECTS} shapes-world objects, got {prompt!r}")
    objects = tuple(
        SceneObject(shape, colour, PROMPT_SCALE, centre)
        for (colour, shape), centre in zip(names, PROMPT_SLOTS[len(names)])
    )
    return Scene(PROMPT_BACKGROUND, objects)


def caption_for(scene: Scene) -> str:
    count = len(scene.objects)
    phrases = [f"{article(item.size)} {item.size} {item.name}" for item in scene.objects]
    return f"{NUMBER_WORDS[count].capitalize()} {plural('shape', count)} on a light background: {join(phrases)}."


def concepts_for(scene: Scene) -> list[str]:
    """The phrases the image shows, without repeats: each object's name, its shape and its colour."""
    phrases = (phrase for item in scene.objects for phrase in (item.name, item.shape, item.colour))
    return list(dict.fromkeys(phrases))


def unique_names(scene: Scene) -> list[list[str]]:
    """For each object, the noun phrases (without "the") that pick it out alone."""
    objects = scene.objects
    kinds = Counter(item.name for item in objects)
    shapes = Counter(item.shape for item in objects)
    colours = Counter(item.colour for item in objects)
    sized = Counter(f"{item.size} {item.name}" for item in objects)
    names = []
    for item in objects:
        own = [item.name] if kinds[item.name] == 1 else []
        own += [item.shape] if shapes[item.shape] == 1 else []
        own += [f"{item.colour} shape"] if colours[item.colour] == 1 else []
        own += [f"{item.size} {item.name}"] if kinds[item.name] > 1 and sized[f"{item.size} {item.name}"] == 1 else []
        names.append(own)
    return names


def referring_expressions(scene: Scene) -> list[list[str]]:
    """For each object, every expression that picks it out alone, by its attributes or by a relation to an
    object that is itself named uniquely ("the shape left of the blue square")."""
    names = unique_names(scene)
    expressions = [[f"the {name}" for name in own] for own in names]
    for anchor_index, anchor in enumerate(scene.objects):
        for anchor_name in names[anchor_index][:1]:
            for relation in RELATIONS:
                matches = [i for i, item in enumerate(scene.objects) if related(item, anchor, relation)]
                if len(matches) == 1:
                    expressions[matches[0]].append(f"the shape {relation} the {anchor_name}")
    return expressions


def questions_for(scene: Scene, rng: random.Random) -> list[tuple[str, str, str]]:
    """`(kind, question, answer)`: one question of each kind the scene allows."""
    objects, names = scene.objects, unique_names(scene)
    questions = []
    by_shape = [item for item, own in zip(objects, names) if item.shape in own]
    if by_shape:
        item = rng.choice(by_shape)
        questions.append(("colour", f"What colour is the {item.shape}?", item.colour))
        colour = item.colour if rng.random() < 0.5 else rng.choice([c for c in PALETTE if c != item.colour])
        answer = "yes" if colour == item.colour else "no"
        questions.append(("attribute", f"Is the {item.shape} {colour}?", answer))
    by_colour = [item for item, own in zip(objects, names) if f"{item.colour} shape" in own]
    if by_colour:
        item = rng.choice(by_colour)
        questions.append(("shape", f"What shape is the {item.colour} object?", item.shape))
    counted = rng.choice(("all", "colour", "shape"))
    if counted == "all":
        questions.append(("count", "How many shapes are there?", str(len(objects))))
    elif counted == "colour":
        colour = rng.choice(tuple(PALETTE))
        count = sum(item.colour == colour for item in objects)
        questions.append(("count", f"How many {colour} shapes are there?", str(count)))
    else:
        shape = rng.choice(SHAPES)
        count = sum(item.shape == shape for item in objects)
        questions.append(("count", f"How many {shape}s are there?", str(count)))
    pairs = [
        (a, b, relation, opposite)
        for a, own_a in zip(objects, names)
        for b, own_b in zip(objects, names)
        if a is not b and own_a and own_b
        for relation, opposite in OPPOSITES.items()
        if related(a, b, relation) or related(a, b, opposite)
    ]
    if pairs:
        a, b, relation, _ = rng.choice(pairs)
        name_a, name_b = names[objects.index(a)][0], names[objects.index(b)][0]
        answer = "yes" if related(a, b, relation) else "no"
        questions.append(("position", f"Is the {name_a} {relation} the {name_b}?", answer))
    present = {item.name for item in objects}
    if rng.random() < 0.5:
        name = rng.choice(sorted(present))
    else:
        name = rng.choice([f"{c} {s}" for c in PALETTE for s in SHAPES if f"{c} {s}" not in present])
    questions.append(("existence", f"Is there {article(name)} {name}?", "yes" if name in present else "no"))
    return questions


@dataclass(frozen=True)
class Edit:
    """One edit of a scene: `operation` is "recolour", "remove", "add" or "move"; `colour` and `shape` name the
    object edited (or added); `value` is the new colour (recolour) or the direction (move)."""

    operation: str
    colour: str
    shape: str
    value: str | None = None

    @property
    def instruction(self) -> str:
        name = f"{self.colour} {self.shape}"
        return {
            "recolour": f"make the {name} {self.value}",
            "remove": f"remove the {name}",
            "add": f"add {article(name)} {name}",
            "move": f"move the {name} {self.value}",
        }[self.operation]

    @classmethod
    def parse(cls, instruction: str) -> Edit:
        """Reads an instruction written like `Edit.instruction`; a ValueError names any other."""
        colour, shape = f"({'|'.join(PALETTE)})", f"({'|'.join(SHAPES)})"
        patterns = {
            "recolour": rf"make the {colour} {shape} {colour}",
            "remove": rf"remove the {colour} {shape}",
            "add": rf"add an? {colour} {shape}",
            "move": rf"move the {colour} {shape} ({'|'.join(DIRECTIONS)})",
        }
        for operation, pattern in patterns.items():
            match = re.fullmatch(pattern, instruction.strip().lower().rstrip("."))
            if match:
                return cls(operation, *match.groups())
        raise ValueError(f"`instruction` is not a shapes-world edit ({', '.join(patterns)}): {instruction!r}")


def propose_edit(scene: Scene, rng: random.Random) -> tuple[Edit, Scene] | None:
    """A random edit the scene allows, and the edited scene (None when it allows none)."""
    objects = scene.objects
    unique = [i for i, own in enumerate(unique_names(scene)) if objects[i].name in own]
    for operation in rng.sample(("recolour", "remove", "add", "move"), 4):
        if operation == "add":
            full = len(objects) == MAX_OBJECTS
            added = None if full else place(rng, rng.choice(SHAPES), rng.choice(tuple(PALETTE)), objects)
            if added is not None:
                return Edit("add", added.colour, added.shape), replace(scene, objects=objects + (added,))
            continue
        if not unique or (operation == "remove" and len(objects) < 2):
            continue
        index = rng.choice(unique)
        item, others = objects[index], objects[:index] + objects[index + 1 :]
        if operation == "remove":
            return Edit("remove", item.colour, item.shape), replace(scene, objects=others)
        if operation == "recolour":
            colour = rng.choice([c for c in PALETTE if c != item.colour])
            edited = replace(item, colour=colour)
            return Edit("recolour", item.colour, item.shape, colour), replace(
                scene, objects=with_object(scene, index, edited)
            )
        for direction in rng.sample(tuple(DIRECTIONS), 4):
            dx, dy = DIRECTIONS[direction]
            x, y = item.centre
            moved = replace(item, centre=(round(x + dx * MOVE_STEP, 3), round(y + dy * MOVE_STEP, 3)))
            if fits(moved, others):
                return Edit("move", item.colour, item.shape, direction), replace(
                    scene, objects=with_object(scene, index, moved)
                )
    return None


def with_object(scene: Scene, index: int, item: SceneObject) -> tuple[SceneObject, ...]:
    return scene.objects[:index] + (item,) + scene.objects[index + 1 :]


def png(image: Image.Image) -> dict:
    """An image as the `datasets.Image()` feature stores it, encoded once however many records share it."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


OBJECT_FEATURES = {
    "shape": datasets.Value("string"),
    "colour": datasets.Value("string"),
    "size": datasets.Value("string"),
    "scale": datasets.Value("float64"),
    "centre": datasets.Sequence(datasets.Value("float64"), length=2),
    "bbox": datasets.Sequence(datasets.Value("int32"), length=4),
}
SCENE_FEATURES = {
    "background": datasets.Sequence(datasets.Value("uint8"), length=3),
    "objects": [OBJECT_FEATURES],
}
FEATURES = {
    "captions": datasets.Features(
        scene_id=datasets.Value("string"),
        image=datasets.Image(),
        caption=datasets.Value("string"),
        concepts=datasets.Sequence(datasets.Value("string")),
        scene=SCENE_FEATURES,
        instance_map=datasets.Image(),
    ),
    "questions": datasets.Features(
        scene_id=datasets.Value("string"),
        image=datasets.Image(),
        question=datasets.Value("string"),
        answer=datasets.Value("string"),
        kind=datasets.Value("string"),
    ),
    "referring": datasets.Features(
        scene_id=datasets.Value("string"),
        image=datasets.Image(),
        expression=datasets.Value("string"),
        mask=datasets.Image(),
        object_index=datasets.Value("int32"),
    ),
    "editing": datasets.Features(
        scene_id=datasets.Value("string"),
        instruction=datasets.Value("string"),
        operation=datasets.Value("string"),
        source_image=datasets.Image(),
        edited_image=datasets.Image(),
        source_scene=SCENE_FEATURES,
        edited_scene=SCENE_FEATURES,
    ),
    "text_to_image": datasets.Features(
        scene_id=datasets.Value("string"), prompt=datasets.Value("string"), image=datasets.Image()
    ),
}


def scene_records(seed: int, index: int, image_size: int) -> dict[str, list[dict]]:
    """Every task's records for scene `index` of `seed`."""
    rng = random.Random(f"shapes-world/{seed}/{index}")
    scene = sample_scene(rng)
    scene_id = f"{seed}-{index}"
    rendered = render_scene(scene, image_size)
    image = png(rendered.image)
    description = scene.describe(rendered.bboxes())
    records: dict[str, list[dict]] = {task: [] for task in TASKS}
    records["captions"].append(
        {
            "scene_id": scene_id,
            "image": image,
            "caption": caption_for(scene),
            "concepts": concepts_for(scene),
            "scene": description,
            "instance_map": png(Image.fromarray(rendered.instance_map)),
        }
    )
    for kind, question, answer in questions_for(scene, rng):
        records["questions"].append(
            {"scene_id": scene_id, "image": image, "question": question, "answer": answer, "kind": kind}
        )
    for object_index, (expressions, mask) in enumerate(zip(referring_expressions(scene), rendered.masks)):
        if expressions:
            records["referring"].append(
                {
                    "scene_id": scene_id,
                    "image": image,
                    "expression": rng.choice(expressions),
                    "mask": png(Image.fromarray(mask)),
                    "object_index": object_index,
                }
            )
    proposal = propose_edit(scene, rng)
    if proposal is not None:
        edit, edited = proposal
        edited_render = render_scene(edited, image_size)
        records["editing"].append(
            {
                "scene_id": scene_id,
                "instruction": edit.instruction,
                "operation": edit.operation,
                "source_image": image,
                "edited_image": png(edited_render.image),
                "source_scene": description,
                "edited_scene": edited.describe(edited_render.bboxes()),
            }
        )
    prompt = prompt_for(scene)
    records["text_to_image"].append(
        {
            "scene_id": scene_id,
            "prompt": prompt,
            "image": png(render_scene(scene_for_prompt(prompt), image_size).image),
        }
    )
    return records


def shapes_world(
    seed: int = 0, num_scenes: int = 1000, image_size: int = 64, tasks: Iterable[str] = TASKS
) -> datasets.DatasetDict:
    """The shapes world's datasets for `num_scenes` scenes drawn from `seed`, one dataset per task (see the
    module docstring for their fields). Use one seed to train and another as the held-out split."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"`seed` must be an integer, got {seed!r}")
    if not isinstance(num_scenes, int) or num_scenes < 1:
        raise ValueError(f"`num_scenes` must be a positive integer, got {num_scenes!r}")
    if not isinstance(image_size, int) or image_size < 16:
        raise ValueError(f"`image_size` must be an integer of at least 16, got {image_size!r}")
    tasks = tuple(tasks)
    unknown = [task for task in tasks if task not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"`tasks` must be a non-empty selection of {TASKS}, got {tasks}")
    columns: dict[str, list[dict]] = {task: [] for task in tasks}
    for index in range(num_scenes):
        for task, records in scene_records(seed, index, image_size).items():
            if task in columns:
                columns[task].extend(records)
    return datasets.DatasetDict(
        {task: datasets.Dataset.from_list(records, features=FEATURES[task]) for task, records in columns.items()}
    )
