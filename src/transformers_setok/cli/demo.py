"""`setok demo`: the shipped tiny Setokim at work on scenes it never saw, as a report to open in a browser.

    setok demo                      # writes demo/index.html
    setok demo --out report/ --model runs/tiny/stage3 --scenes 6

Offline, on the CPU: it answers questions about sample scenes of the shapes world, segments referred objects,
shows each image's SeTok tokens over it, redraws images from their tokens, draws from prompts and edits, then
writes the pictures as PNGs beside `index.html`, prints where the report is and one line per task.
"""

from __future__ import annotations

import argparse
import html
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from ..recipes.evaluation import (
    RenderSettings,
    TaskResult,
    answer_questions,
    apply_edits,
    count_tokens,
    draw_prompts,
    reconstruct_images,
    segment_expressions,
)
from ..shapes_world import shapes_world
from ..visualization import draw_token_regions
from .generate import load_setokim, mask_overlay
from .tokenize import positive_int

SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "pretrained" / "setokim-tiny-shapes"
DEMO_SEED = 2026  # a world seed the shipped model never trained on (it trained on seed 0, was measured on seed 1)
DISPLAY_SIDE = 192
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
.row { display: flex; flex-wrap: wrap; gap: 1.2em; }
figure { margin: 0; width: 200px; }
figure img { width: 192px; height: 192px; image-rendering: pixelated; border: 1px solid #ccc; }
figcaption { font-size: 0.85em; margin-top: 0.3em; }
.ok { color: #1a7f37; } .miss { color: #cf222e; }
"""


class Report:
    """The PNGs and HTML sections of the report, written as they come."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.sections: list[str] = []
        (out / "images").mkdir(parents=True, exist_ok=True)

    def image(self, picture: Image.Image, name: str) -> str:
        path = f"images/{name}.png"
        picture.convert("RGB").resize((DISPLAY_SIDE, DISPLAY_SIDE), Image.Resampling.NEAREST).save(self.out / path)
        return path

    def section(self, title: str, summary: str, figures: Sequence[tuple[str, str]]) -> None:
        items = "".join(
            f'<figure><img src="{path}" alt="{html.escape(caption)}"><figcaption>{caption}</figcaption></figure>'
            for path, caption in figures
        )
        self.sections.append(f"<h2>{html.escape(title)}</h2><p>{summary}</p><div class='row'>{items}</div>")

    def write(self, model: str) -> Path:
        page = (
            "<!doctype html><html><head><meta charset='utf-8'><title>Setokim demo</title>"
            f"<style>{STYLE}</style></head><body><h1>Setokim on the shapes world</h1>"
            f"<p>Model <code>{html.escape(model)}</code>, scenes of world seed {DEMO_SEED} (never seen in "
            "training). Every picture is 64x64, shown enlarged.</p>" + "".join(self.sections) + "</body></html>"
        )
        path = self.out / "index.html"
        path.write_text(page)
        return path


def verdict(correct: bool, text: str) -> str:
    return f"<span class='{'ok' if correct else 'miss'}'>{html.escape(text)}</span>"


def add_questions(report: Report, result: TaskResult) -> str:
    figures = []
    for index, example in enumerate(result.examples):
        correct = example["correct"]
        caption = f"{html.escape(example['question'])}<br>" + verdict(
            correct, f"{example['prediction']!r}" + ("" if correct else f" (truth: {example['answer']!r})")
        )
        figures.append((report.image(example["image"], f"question_{index}"), caption))
    accuracy = result.metrics["accuracy"]
    summary = f"{accuracy:.0%} of {len(result.examples)} questions answered right"
    report.section("Questions", summary, figures)
    return summary


def add_segmentation(report: Report, result: TaskResult) -> str:
    figures = []
    for index, example in enumerate(result.examples):
        picture = mask_overlay(example["image"], example["prediction"])
        caption = f"{html.escape(example['expression'])}<br>IoU {example['iou']:.2f}"
        figures.append((report.image(picture, f"segment_{index}"), caption))
    summary = f"gIoU {result.metrics['giou']:.2f} over {len(result.examples)} referring expressions"
    report.section("Referring segmentation", summary, figures)
    return summary


def add_tokens(report: Report, result: TaskResult) -> str:
    figures = []
    for index, example in enumerate(result.examples):
        picture = example["image"].convert("RGB").resize((DISPLAY_SIDE, DISPLAY_SIDE), Image.Resampling.NEAREST)
        assignment = example["assignment"]  # the patch grid's token labels
        regions = draw_token_regions(picture, assignment.ravel(), assignment.shape)
        caption = f"{example['num_objects']} objects, {example['num_tokens']} tokens"
        figures.append((report.image(regions, f"tokens_{index}"), caption))
    counts = ", ".join(f"{e['num_objects']}->{e['num_tokens']}" for e in result.examples)
    summary = f"objects->tokens {counts}"
    report.section("SeTok tokens over each image", summary, figures)
    return summary


def add_pairs(report: Report, title: str, name: str, result: TaskResult, caption_key: str, summary: str) -> str:
    figures = []
    for index, example in enumerate(result.examples):
        caption = html.escape(str(example[caption_key]))
        figures.append((report.image(example["image"], f"{name}_{index}_input"), f"input: {caption}"))
        figures.append((report.image(example["prediction"], f"{name}_{index}_output"), f"Setokim: {caption}"))
    report.section(title, summary, figures)
    return summary


def run(args: argparse.Namespace) -> int:
    model_path = str(args.model)
    model, processor = load_setokim("demo", model_path)
    world = {
        task: list(dataset)
        for task, dataset in shapes_world(DEMO_SEED, args.scenes, processor.image_processor.size.height).items()
    }
    render = RenderSettings(num_inference_steps=args.steps)
    report = Report(args.out)
    lines = {}
    questions = world["questions"][: 2 * args.scenes]
    lines["questions"] = add_questions(report, answer_questions(model, processor, questions, args.scenes))
    lines["segmentation"] = add_segmentation(
        report, segment_expressions(model, processor, world["referring"][: args.scenes], args.scenes)
    )
    tokens = count_tokens(model, processor, world["captions"], args.scenes)
    lines["tokens"] = add_tokens(report, tokens)
    images = [record["image"] for record in world["captions"]]
    reconstruction = reconstruct_images(model, processor, images, args.scenes, render)
    lines["reconstruction"] = add_pairs(
        report,
        "Redrawn from its tokens",
        "reconstruction",
        reconstruction,
        "num_tokens",
        f"PSNR {reconstruction.metrics['psnr']:.1f} dB over {len(images)} images (caption: token count)",
    )
    drawing = draw_prompts(model, processor, world["text_to_image"], args.scenes, render)
    lines["drawing"] = add_pairs(
        report,
        "Drawn from text",
        "drawing",
        drawing,
        "prompt",
        f"{drawing.metrics['accuracy']:.0%} of {len(drawing.examples)} drawings show every object asked for",
    )
    editing = apply_edits(model, processor, world["editing"], args.scenes, render)
    lines["editing"] = add_pairs(
        report,
        "Edited",
        "editing",
        editing,
        "instruction",
        f"{editing.metrics['accuracy']:.0%} of {len(editing.examples)} edits changed what was asked and kept the rest",
    )
    page = report.write(model_path)
    print(f"Report: {page.resolve()}")
    for task, line in lines.items():
        print(f"  {task}: {line}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "demo",
        help="run the shipped tiny Setokim on unseen scenes and write an HTML report",
        description="Answer, segment, show tokens, reconstruct, draw and edit on scenes of the shapes world; write "
        "<out>/index.html with the pictures.",
    )
    parser.add_argument("--model", default=SHIPPED_MODEL, help="Setokim folder (default: the shipped tiny model)")
    parser.add_argument("--out", type=Path, default=Path("demo"), help="report folder (default: %(default)s)")
    parser.add_argument("--scenes", type=positive_int, default=4, help="sample scenes (default: %(default)s)")
    parser.add_argument("--steps", type=positive_int, default=10, help="sampler steps (default: %(default)s)")
    parser.set_defaults(handler=run)
