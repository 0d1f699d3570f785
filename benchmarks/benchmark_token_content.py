"""What SeTok's tokens carry: linear probes for each object's colour and shape in the shapes world.

For every object of a scene, its token is the one most of the object's patches join; a linear classifier trained
on the tokens of one world seed predicts the object's colour, and its shape, on the tokens of another seed. The
same probe on the mean of the object's encoder patch features tells the tokenizer's merger from its encoder. A
token that carries an attribute lets the language model answer questions about it; one that does not cannot.

Usage:
    python benchmarks/benchmark_token_content.py                      # the shipped model
    python benchmarks/benchmark_token_content.py --model runs/tiny/stage1 --name stage1
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from machine import machine_info
from transformers import AutoConfig

from transformers_setok import (
    SetokDetokenizer,
    SetokForPreTraining,
    SetokImageProcessor,
    SetokimForConditionalGeneration,
    SetokModel,
    shapes_world,
)
from transformers_setok.cli.demo import SHIPPED_MODEL

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ATTRIBUTES = ("colour", "shape")


def load_parts(path: str | Path) -> tuple[SetokModel, SetokDetokenizer]:
    """The SeTok tokenizer and detokenizer of a Setokim or a stage-1 (`SetokForPreTraining`) folder."""
    if AutoConfig.from_pretrained(path).model_type == "setokim":
        model = SetokimForConditionalGeneration.from_pretrained(path)
        return model.model.setok.eval(), model.detokenizer.eval()
    model = SetokForPreTraining.from_pretrained(path)
    return model.setok.eval(), model.detokenizer.eval()


def load_tokenizer(path: str | Path) -> tuple[SetokModel, SetokImageProcessor]:
    """The SeTok tokenizer of a Setokim or a stage-1 folder, and its image processor."""
    return load_parts(path)[0], SetokImageProcessor.from_pretrained(path)


def object_features(
    setok: SetokModel, image_processor: SetokImageProcessor, seed: int, num_scenes: int, batch_size: int = 50
) -> dict[str, Any]:
    """Per object of `num_scenes` scenes of world `seed`: its token, its mean patch feature, colour and shape."""
    scenes = list(
        shapes_world(seed, num_scenes, setok.config.vision_config.image_size, tasks=("captions",))["captions"]
    )
    tokens, patches, labels = [], [], {attribute: [] for attribute in ATTRIBUTES}
    for start in range(0, len(scenes), batch_size):
        batch = scenes[start : start + batch_size]
        pixel_values = image_processor([scene["image"] for scene in batch], return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            out = setok(pixel_values)
        height, width = out.grid_size
        for index, scene in enumerate(batch):
            instances = np.asarray(scene["instance_map"])  # 0 is the background, object k is k + 1
            cell_y, cell_x = instances.shape[0] // height, instances.shape[1] // width
            patch_instance = torch.from_numpy(instances[cell_y // 2 :: cell_y, cell_x // 2 :: cell_x].ravel())
            assignment = out.assignment[index]
            for number, obj in enumerate(scene["scene"]["objects"], start=1):
                members = (patch_instance == number) & (assignment >= 0)
                if not bool(members.any()):
                    continue  # hidden behind other objects at the patch grid's resolution
                token = int(torch.bincount(assignment[members]).argmax())
                tokens.append(out.tokens[index, token].float().numpy())
                patches.append(out.patch_features[index, members].float().mean(dim=0).numpy())
                for attribute in ATTRIBUTES:
                    labels[attribute].append(obj[attribute])
    return {"tokens": np.stack(tokens), "patches": np.stack(patches), **labels}


def probe_accuracy(
    train: np.ndarray, train_labels: Sequence[str], test: np.ndarray, test_labels: Sequence[str], steps: int = 500
) -> float:
    """Held-out accuracy of a linear classifier (standardised inputs, Adam, a little weight decay)."""
    classes = sorted(set(train_labels))
    mean, std = train.mean(axis=0), train.std(axis=0) + 1e-6
    inputs = torch.tensor((train - mean) / std, dtype=torch.float32)
    targets = torch.tensor([classes.index(label) for label in train_labels])
    torch.manual_seed(0)
    classifier = torch.nn.Linear(inputs.shape[1], len(classes))
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(classifier(inputs), targets).backward()
        optimizer.step()
    with torch.no_grad():
        predicted = classifier(torch.tensor((test - mean) / std, dtype=torch.float32)).argmax(dim=1)
    return float(np.mean([classes[int(p)] == label for p, label in zip(predicted, test_labels)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(SHIPPED_MODEL), help="a Setokim or stage-1 folder")
    parser.add_argument("--name", default="shipped", help="names the results files: token_content_<name>")
    parser.add_argument("--train-scenes", type=int, default=600)
    parser.add_argument("--test-scenes", type=int, default=200)
    args = parser.parse_args()
    setok, image_processor = load_tokenizer(args.model)
    train = object_features(setok, image_processor, seed=0, num_scenes=args.train_scenes)
    test = object_features(setok, image_processor, seed=1, num_scenes=args.test_scenes)
    rows = []
    for attribute in ATTRIBUTES:
        majority = max(np.mean([label == value for label in test[attribute]]) for value in set(test[attribute]))
        row = {"attribute": attribute, "classes": len(set(train[attribute])), "majority": float(majority)}
        for source in ("tokens", "patches"):
            row[source] = probe_accuracy(train[source], train[attribute], test[source], test[attribute])
        rows.append(row)
    report = {
        "model": args.name,
        "objects": {"train": len(train["colour"]), "test": len(test["colour"])},
        "rows": rows,
        "machine": machine_info(),
    }
    command_arguments = "" if args.model == str(SHIPPED_MODEL) else f" --model {args.model} --name {args.name}"
    lines = [
        f"# What the tokens carry: `{args.name}`",
        "",
        f"Linear probes trained on {report['objects']['train']} objects of world seed 0 ({args.train_scenes} "
        f"scenes), tested on {report['objects']['test']} objects of seed 1 ({args.test_scenes} scenes). "
        f"Command: `python benchmarks/benchmark_token_content.py{command_arguments}`.",
        "",
        "| attribute | classes | majority class | probe on the object's token | probe on its mean patch feature |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {r['attribute']} | {r['classes']} | {r['majority']:.3f} | {r['tokens']:.3f} | {r['patches']:.3f} |"
            for r in rows
        ),
        "",
    ]
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / f"token_content_{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS_DIR / f"token_content_{args.name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
