"""Benchmark prompt-aware token reduction (TRSM, `visual_token_keep`) on the trained tiny Setokim.

On the shipped model and the questions of a held-out seed of the shapes world (seed 1, which no training step
saw), for `keep` 1.0, 0.8, 0.6, 0.4 and 0.2:

1. Answer accuracy (greedy, the `answer_accuracy` metric) when each image keeps the tokens its question matches,
   with and without merging the dropped tokens into the kept ones, against dropping the same number of tokens
   at random (the baseline a reduction method must beat; the mean over `--random-seeds` draws).
2. Prefill time of one batch of questions, for the whole forward (SeTok, reduction and the language model) and
   for the language model alone on the expanded sequence, with the image tokens and sequence length it reads.

Settings compared with each other are timed in alternation in one process, so background load hits them alike;
the ratios to `keep=1.0` are the numbers to read.

Usage:
    python benchmarks/benchmark_token_reduction.py          # full run (minutes), writes benchmarks/results/
    python benchmarks/benchmark_token_reduction.py --quick  # smoke run on a few scenes (seconds)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from benchmark_tokenizer_head import time_side_by_side
from machine import machine_info
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from transformers_setok import SetokimForConditionalGeneration, modeling_setokim, shapes_world
from transformers_setok.cli.demo import SHIPPED_MODEL
from transformers_setok.recipes.evaluation import answer_questions
from transformers_setok.recipes.world_data import chat_inputs
from transformers_setok.token_reduction import TokenReductionOutput, keep_best_scored, kept_counts
from transformers_setok.visualization import draw_token_regions

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

logger = logging.getLogger("benchmark_token_reduction")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
KEEPS = (1.0, 0.8, 0.6, 0.4, 0.2)
METHODS = ("prompt", "prompt + merge", "random")


def random_token_reduction(generator: torch.Generator) -> Callable[..., TokenReductionOutput]:
    """A drop-in for `prompt_aware_token_reduction` that keeps as many tokens, chosen at random (in order)."""

    def reduce(image_embeds, token_mask, text_embeds, text_mask, keep, merge_dropped=False, image_rows=None):
        scores = torch.rand(token_mask.shape, generator=generator)
        return keep_best_scored(image_embeds, token_mask.bool(), scores, keep, merge_dropped)

    return reduce


@contextlib.contextmanager
def reduction_setting(
    model: SetokimForConditionalGeneration, keep: float, method: str, seed: int = 0
) -> Iterator[None]:
    """The model reads each image's tokens as `method` chooses them, `keep` of them (all at 1.0)."""
    original = modeling_setokim.prompt_aware_token_reduction
    model.config.visual_token_keep = None if keep == 1.0 else keep
    model.config.visual_token_merge = method == "prompt + merge"
    if method == "random":
        modeling_setokim.prompt_aware_token_reduction = random_token_reduction(torch.Generator().manual_seed(seed))
    try:
        yield
    finally:
        modeling_setokim.prompt_aware_token_reduction = original
        model.config.visual_token_keep, model.config.visual_token_merge = None, False


def accuracy_rows(model, processor, questions: list[dict], random_seeds: int) -> list[dict[str, Any]]:
    """Answer accuracy, overall and per kind, for every keep and method (keep 1.0 once: nothing is dropped)."""
    rows = []
    for keep in KEEPS:
        for method in METHODS if keep < 1.0 else ("all tokens",):
            seeds = range(random_seeds) if method == "random" else range(1)
            runs = []
            for seed in seeds:
                logger.info("accuracy: keep %.1f, %s, draw %d", keep, method, seed)
                with reduction_setting(model, keep, method, seed):
                    runs.append(answer_questions(model, processor, questions, batch_size=32).metrics)
            kinds = sorted(key for key in runs[0] if key.startswith("accuracy_"))
            rows.append(
                {
                    "keep": keep,
                    "method": method,
                    "accuracy": float(np.mean([run["accuracy"] for run in runs])),
                    "accuracy_draws": [run["accuracy"] for run in runs] if method == "random" else None,
                    **{kind: float(np.mean([run[kind] for run in runs])) for kind in kinds},
                }
            )
    return rows


def image_token_counts(model, processor, questions: list[dict], batch_size: int = 64) -> torch.LongTensor:
    """SeTok's token count for each question's image, before any reduction."""
    counts = []
    for start in range(0, len(questions), batch_size):
        images = [q["image"] for q in questions[start : start + batch_size]]
        pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            counts.append(model.get_image_features(pixel_values).num_tokens)
    return torch.cat(counts)


def prefill_rows(model, processor, questions: list[dict], repeats: int, budget_s: float) -> list[dict[str, Any]]:
    """Prefill seconds of one batch per keep (prompt-matched tokens), whole and language model alone."""
    inputs = chat_inputs(processor, [q["question"] for q in questions], [q["image"] for q in questions])
    expanded, calls = {}, {}
    for keep in KEEPS:
        setting = {} if keep == 1.0 else {"visual_token_keep": keep}
        with torch.inference_mode():
            prepared = model.model.prepare_multimodal_inputs(
                inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"], padding_side="left", **setting
            )
            embeds = model.model.embed_with_images(prepared.input_ids, prepared.image_embeds)
        expanded[keep] = prepared
        calls[f"whole {keep}"] = lambda setting=setting: model(**inputs, **setting, logits_to_keep=1)
        calls[f"language model {keep}"] = lambda p=prepared, e=embeds: model.model.language_model(
            inputs_embeds=e, attention_mask=p.attention_mask, position_ids=p.position_ids, use_cache=True
        )
    with torch.inference_mode():
        timings, _ = time_side_by_side(calls, len(questions), repeats, budget_s)
    rows = []
    for keep in KEEPS:
        features = expanded[keep].image_features
        rows.append(
            {
                "keep": keep,
                "image_tokens_per_image": float(features.num_tokens.float().mean()),
                "image_tokens_before": float(features.num_tokens_before_reduction.float().mean()),
                "sequence_length": int(expanded[keep].attention_mask.shape[1]),
                "whole_ms_per_question": 1e3 * timings[f"whole {keep}"].seconds_per_image,
                "language_model_ms_per_question": 1e3 * timings[f"language model {keep}"].seconds_per_image,
                "repeats": timings[f"whole {keep}"].repeats,
            }
        )
    for row in rows:
        row["whole_ratio"] = row["whole_ms_per_question"] / rows[0]["whole_ms_per_question"]
        row["language_model_ratio"] = row["language_model_ms_per_question"] / rows[0]["language_model_ms_per_question"]
    return rows


def kept_regions_figure(model, processor, questions: list[dict], keep: float, target: Path) -> None:
    """Per question: the image's SeTok regions, and those its question keeps (dropped regions untinted), with the
    greedy answers from all tokens and from the kept ones."""
    inputs = chat_inputs(processor, [q["question"] for q in questions], [q["image"] for q in questions])
    with torch.inference_mode():
        features = model(**inputs, visual_token_keep=keep).image_outputs
        prompt_length = inputs["input_ids"].shape[1]
        answers = {
            setting: processor.batch_decode(
                model.generate(**inputs, max_new_tokens=6, do_sample=False, **extra)[:, prompt_length:],
                skip_special_tokens=True,
            )
            for setting, extra in (("all", {}), ("kept", {"visual_token_keep": keep}))
        }
    tokenized = features.tokenizer_output
    figure, axes = plt.subplots(2, len(questions), figsize=(3.2 * len(questions), 7), squeeze=False)
    for column, question in enumerate(questions):
        display = question["image"].resize((256, 256), Image.NEAREST)
        assignment = tokenized.assignment[column]
        kept = features.kept_indices[column][features.kept_indices[column] >= 0]
        dropped_out = torch.where(torch.isin(assignment, kept), assignment, torch.full_like(assignment, -1))
        panels = (
            (assignment, f"all {int(features.num_tokens_before_reduction[column])} tokens: {answers['all'][column]}"),
            (dropped_out, f"kept {len(kept)} (keep {keep}): {answers['kept'][column]}"),
        )
        for row, (labels, caption) in enumerate(panels):
            title = f"{question['question']}\n{caption}" if row == 0 else caption
            axes[row, column].imshow(draw_token_regions(display, labels, tokenized.grid_size))
            axes[row, column].set_title(title, fontsize=9)
            axes[row, column].axis("off")
    figure.tight_layout()
    figure.savefig(target, dpi=100)
    plt.close(figure)


def markdown(report: dict[str, Any]) -> str:
    """The results as the page `docs/token_reduction.md` links to."""
    setup = report["setup"]
    lines = [
        "# Prompt-aware token reduction on the trained tiny Setokim",
        "",
        f"The shipped `setokim-tiny-shapes` on the {setup['questions']} questions of {setup['scenes']} scenes of "
        f"shapes-world seed {setup['seed']} (held out from training); greedy answers, `answer_accuracy`. Random "
        f"drop keeps as many tokens as the prompt does, chosen at random (mean of {setup['random_seeds']} draws).",
        "",
        "## Answer accuracy",
        "",
        "| keep | image tokens / image | prompt | prompt + merge | random |",
        "|---:|---:|---:|---:|---:|",
    ]
    by_keep: dict[float, dict[str, float]] = {}
    for row in report["accuracy"]:
        by_keep.setdefault(row["keep"], {})[row["method"]] = row["accuracy"]
    tokens = report["image_tokens_per_image"]
    for keep, methods in by_keep.items():
        if "all tokens" in methods:
            value = f"{methods['all tokens']:.3f}"
            lines.append(f"| {keep:.1f} | {tokens[str(keep)]:.2f} | {value} | {value} | {value} |")
        else:
            cells = " | ".join(f"{methods[m]:.3f}" for m in METHODS)
            lines.append(f"| {keep:.1f} | {tokens[str(keep)]:.2f} | {cells} |")
    colour = {(row["keep"], row["method"]): row["accuracy_colour"] for row in report["accuracy"]}
    all_tokens = f"{colour[1.0, 'all tokens']:.3f}"
    lines += [
        "",
        "## Colour questions",
        "",
        "The questions about what the tokens carry best (a linear probe reads colour from an object's token):",
        "",
        "| keep | prompt | prompt + merge | random |",
        "|---:|---:|---:|---:|",
        f"| 1.0 | {all_tokens} | {all_tokens} | {all_tokens} |",
        *(f"| {keep:.1f} | " + " | ".join(f"{colour[keep, m]:.3f}" for m in METHODS) + " |" for keep in KEEPS[1:]),
    ]
    lines += [
        "",
        f"## Prefill of one batch of {setup['prefill_batch']} questions (prompt-matched tokens)",
        "",
        "| keep | image tokens / image | sequence length | whole forward, ms / question | ratio "
        "| language model alone, ms / question | ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["prefill"]:
        lines.append(
            f"| {row['keep']:.1f} | {row['image_tokens_per_image']:.2f} | {row['sequence_length']} "
            f"| {row['whole_ms_per_question']:.2f} | {row['whole_ratio']:.3f} "
            f"| {row['language_model_ms_per_question']:.2f} | {row['language_model_ratio']:.3f} |"
        )
    machine = report["machine"]
    lines += [
        "",
        "Median of the timed repeats after a warm-up, wall-clock, settings timed in alternation in one process.",
        "",
        f"Machine: {machine['cpu_model']}, {machine['logical_cpus']} logical CPUs, torch {machine['torch']} "
        f"({machine['torch_threads']} threads), transformers {machine['transformers']}; load average at start "
        f"{', '.join(f'{value:.1f}' for value in machine['load_average_at_start'])}. "
        f"Command: `{setup['command']}`.",
        "",
    ]
    return "\n".join(lines)


def plot(report: dict[str, Any], target: Path) -> None:
    """Accuracy against the share of tokens kept, per method; prefill time beside it."""
    figure, (accuracy_axis, time_axis) = plt.subplots(1, 2, figsize=(10, 4))
    full = next(row["accuracy"] for row in report["accuracy"] if row["keep"] == 1.0)
    for method, style in zip(METHODS, ("o-", "s--", "x:")):
        points = [(1.0, full)] + [(r["keep"], r["accuracy"]) for r in report["accuracy"] if r["method"] == method]
        accuracy_axis.plot(*zip(*points), style, label=method)
    accuracy_axis.set(
        xlabel="keep (share of each image's tokens)", ylabel="answer accuracy", title="Accuracy", ylim=(0, 1)
    )
    accuracy_axis.invert_xaxis()
    accuracy_axis.legend()
    keeps = [row["keep"] for row in report["prefill"]]
    time_axis.plot(keeps, [row["whole_ratio"] for row in report["prefill"]], "o-", label="whole forward")
    time_axis.plot(keeps, [row["language_model_ratio"] for row in report["prefill"]], "s--", label="language model")
    time_axis.set(xlabel="keep", ylabel="prefill time / keep 1.0", title="Prefill time")
    time_axis.invert_xaxis()
    time_axis.legend()
    figure.tight_layout()
    figure.savefig(target, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few scenes, one random draw, one repeat")
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--random-seeds", type=int, default=3)
    parser.add_argument("--prefill-batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.quick:
        args.scenes, args.random_seeds, args.prefill_batch, args.repeats = 6, 1, 4, 1
    torch.manual_seed(0)
    started = time.perf_counter()
    model = AutoModelForImageTextToText.from_pretrained(SHIPPED_MODEL).eval()
    processor = AutoProcessor.from_pretrained(SHIPPED_MODEL)
    image_size = model.config.setok_config.vision_config.image_size
    questions = list(shapes_world(args.seed, args.scenes, image_size)["questions"])
    counts = image_token_counts(model, processor, questions)
    report = {
        "setup": {
            "seed": args.seed,
            "scenes": args.scenes,
            "questions": len(questions),
            "random_seeds": args.random_seeds,
            "prefill_batch": args.prefill_batch,
            "command": "python benchmarks/benchmark_token_reduction.py" + (" --quick" if args.quick else ""),
        },
        "machine": machine_info(),
        "image_tokens_per_image": {str(keep): float(kept_counts(counts, keep).float().mean()) for keep in KEEPS},
        "accuracy": accuracy_rows(model, processor, questions, args.random_seeds),
        "prefill": prefill_rows(model, processor, questions[: args.prefill_batch], args.repeats, budget_s=30.0),
    }
    report["seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "token_reduction_quick" if args.quick else "token_reduction"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(report))
    plot(report, args.out / f"{stem}.png")
    kept_regions_figure(model, processor, questions[:4], 0.5, args.out / f"{stem}_examples.png")
    print(markdown(report))
    print(f"wrote {args.out / stem}.{{json,md,png}} in {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
