"""`setok evaluate`: a Setokim measured on a held-out seed of the shapes world, every task.

    setok evaluate --model runs/tiny/stage3 --seed 1 --json metrics.json

prints each task's metrics (answer accuracy, referring gIoU/cIoU, reconstruction PSNR, the scene reader's
verdicts on drawn and edited images, the Spearman correlation of object and token counts) and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..recipes.evaluation import EVALUATED_TASKS, RenderSettings, evaluate_world, summary
from ..recipes.training_card import training_card
from .errors import failure_for
from .generate import load_setokim
from .tokenize import positive_int
from .train import COMMAND_FILE

fail = failure_for("evaluate")


def run(args: argparse.Namespace) -> int:
    tasks = args.tasks.split(",") if args.tasks else list(EVALUATED_TASKS)
    unknown = sorted(set(tasks) - set(EVALUATED_TASKS))
    if unknown:
        fail(f"--tasks {','.join(unknown)}: unknown; choose from {','.join(EVALUATED_TASKS)}")
    model, processor = load_setokim("evaluate", args.model)
    render = RenderSettings(num_inference_steps=args.steps, guidance_scale=args.guidance_scale)
    results = summary(evaluate_world(model, processor, args.seed, args.num_scenes, tasks, args.batch_size, render))
    report = {"model": str(args.model), "seed": args.seed, "num_scenes": args.num_scenes, "metrics": results}
    for task, metrics in results.items():
        print(f"{task}: " + ", ".join(f"{name} {value:g}" for name, value in metrics.items()))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"metrics written to {args.json}")
    if args.write_card:
        write_card(args, report)
    return 0


def write_card(args: argparse.Namespace, report: dict) -> None:
    """The model card of a recipe run's final model: its `README.md`, with the metrics just measured."""
    model, run = Path(args.model), Path(args.model).parent
    commands = run / COMMAND_FILE
    if not (run / "stage1" / "recipe.yaml").is_file() or not commands.is_file():
        fail(f"--write-card needs a `setok train` run: {run} has no stage1/recipe.yaml or {COMMAND_FILE}")
    evaluate_command = f"setok evaluate --model {model} --seed {args.seed} --num-scenes {args.num_scenes}"
    card = training_card(model, run, report, commands.read_text().strip(), evaluate_command)
    card.save(model / "README.md")
    print(f"model card written to {model / 'README.md'}")


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "evaluate",
        help="measure a Setokim on a held-out seed of the shapes world",
        description="Answer questions, segment, reconstruct, draw and edit on scenes of --seed, and score them.",
    )
    parser.add_argument("--model", required=True, help="Setokim checkpoint folder (e.g. <run>/stage3)")
    parser.add_argument("--seed", type=int, default=1, help="world seed, one training never saw (default: 1)")
    parser.add_argument("--num-scenes", type=positive_int, default=100, help="scenes (default: %(default)s)")
    parser.add_argument("--tasks", help=f"comma-separated subset of {','.join(EVALUATED_TASKS)} (default: all)")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="(default: %(default)s)")
    parser.add_argument("--steps", type=positive_int, default=10, help="sampler steps (default: %(default)s)")
    parser.add_argument("--guidance-scale", type=float, default=3.0, help="(default: %(default)s)")
    parser.add_argument("--json", type=Path, help="write the metrics here as JSON")
    parser.add_argument(
        "--write-card",
        action="store_true",
        help="write the model card (README.md) of a `setok train` run's final model, with these metrics",
    )
    parser.set_defaults(handler=run)
