"""Benchmark SeTok's vision encoder stopping at its feature layer, the head's share, and bfloat16 on this CPU.

At SigLIP-so400m sizes (384x384 pixels, patch 14, 27 layers of width 1152; merger as in
`benchmark_tokenizer_head.py`), random weights built from the config, on the package's three sample images:

1. Encoder: the whole encoder run for its hidden states (every layer, the final norm and the pooling head, then
   hidden state -2 taken, as SeTok did before) against `SetokModel.get_patch_features`, which stops as the
   feature layer is entered. Both give the same features (checked bit for bit); the ratio is the saving.
2. The tokenizer head (clustering + merger, `tokenize_features`) at 64 and at 729 tokens per image, pinned with
   `min_tokens = max_tokens`, as a share of the whole tokenizer (truncated encoder + head).
3. The truncated encoder and the head in float32 and in bfloat16 (the same weights rounded), and each image's token
   count at the default threshold (no pinned count) in both.

Calls compared with each other are timed in alternation in one process, so background load hits them alike; the
ratios are the numbers to read.

Usage:
    python benchmarks/benchmark_encoder_truncation.py          # full run (minutes), writes benchmarks/results/
    python benchmarks/benchmark_encoder_truncation.py --quick  # smoke run on small sizes (seconds)

The results in benchmarks/results/ come from
`OMP_WAIT_POLICY=PASSIVE nice -n 19 python benchmarks/benchmark_encoder_truncation.py --images 1` on CPUs
another job kept busy (passive OpenMP threads sleep rather than spin while they wait, so CPU time counts work).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from benchmark_tokenizer_head import FULL, QUICK, Sizes, Timing, build_model, format_seconds, time_side_by_side
from machine import machine_info
from PIL import Image

from transformers_setok import SetokImageProcessor

logger = logging.getLogger("benchmark_encoder_truncation")

CLOCKS = {
    "cpu": (time.process_time, "CPU seconds of this process (both threads)"),
    "wall": (time.perf_counter, "wall-clock seconds"),
}
RESULTS_DIR = Path(__file__).resolve().parent / "results"
SAMPLE_IMAGES = Path(__file__).resolve().parent.parent / "src" / "transformers_setok" / "sample_images"


def sample_pixel_values(sizes: Sizes, num_images: int) -> tuple[list[str], torch.Tensor]:
    """The first `num_images` sample images' names and pixel values at the encoder's input size."""
    paths = sorted(SAMPLE_IMAGES.glob("*.png"))[:num_images]
    side = sizes.encoder["image_size"]
    processor = SetokImageProcessor(size={"height": side, "width": side})
    images = [Image.open(path).convert("RGB") for path in paths]
    return [path.stem for path in paths], processor(images=images, return_tensors="pt").pixel_values


def head_share(count: int, head: Timing, encoder: Timing) -> dict:
    """The head's timing at `count` tokens per image and its share of the tokenizer (encoder + head)."""
    share = head.seconds_per_image / (head.seconds_per_image + encoder.seconds_per_image)
    return {"tokens_per_image": count, **asdict(head), "share_of_tokenizer": share}


def run(sizes: Sizes, num_images: int, repeats: int, budget_s: float, seed: int, clock: str) -> dict:
    """All three measurements; the results as a dict."""
    started = time.perf_counter()
    machine = machine_info()
    torch.manual_seed(seed)
    logger.info("building the model (random weights)")
    models = {"float32": build_model(sizes)}
    models["bfloat16"] = copy.deepcopy(models["float32"]).to(torch.bfloat16)
    names, pixel_values = sample_pixel_values(sizes, num_images)
    num_images, layer = len(names), models["float32"].config.vision_feature_layer
    grid_size = models["float32"].config.patch_grid_size
    pixels = {dtype: pixel_values.to(model.dtype) for dtype, model in models.items()}
    with torch.inference_mode():
        logger.info("encoder: whole vs stopped at hidden state %d", layer)
        encoders, features = time_side_by_side(
            {
                "whole float32": lambda: (
                    models["float32"]
                    .vision_model(pixel_values=pixel_values, output_hidden_states=True)
                    .hidden_states[layer]
                ),
                **{
                    f"truncated {dtype}": lambda dtype=dtype: models[dtype].get_patch_features(pixels[dtype])[0]
                    for dtype in models
                },
            },
            num_images,
            repeats,
            budget_s,
            CLOCKS[clock][0],
        )
        logger.info("tokenizer head at %s tokens per image", sizes.cluster_counts)
        heads, _ = time_side_by_side(
            {
                f"{dtype} {count}": lambda dtype=dtype, count=count: models[dtype].tokenize_features(
                    features[f"truncated {dtype}"], grid_size, min_tokens=count, max_tokens=count
                )
                for dtype in models
                for count in sizes.cluster_counts
            },
            num_images,
            repeats,
            budget_s,
            CLOCKS[clock][0],
        )
        clustered = {
            dtype: model.tokenize_features(features[f"truncated {dtype}"], grid_size)
            for dtype, model in models.items()
        }
    whole, truncated = encoders["whole float32"], encoders["truncated float32"]
    return {
        "machine": {
            **machine,
            "load_average_at_end": os.getloadavg(),
            "run_seconds": round(time.perf_counter() - started, 1),
        },
        "settings": {
            "sizes": asdict(sizes),
            "images": names,
            "feature_layer": layer,
            "repeats": repeats,
            "budget_seconds_per_measurement": budget_s,
            "seed": seed,
            "clock": CLOCKS[clock][1],
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset (OpenMP threads spin while they wait)"),
            "inputs": "the package's sample images, random weights (seeded); torch.inference_mode, eval",
            "cluster_threshold": models["float32"].config.cluster_threshold,
        },
        "encoder": {
            "whole": asdict(whole),
            "truncated": asdict(truncated),
            "truncated_over_whole": truncated.seconds_per_image / whole.seconds_per_image,
            "layers_run": f"{sizes.encoder['num_hidden_layers'] + layer + 1} of {sizes.encoder['num_hidden_layers']}",
            "identical_features": torch.equal(features["whole float32"], features["truncated float32"]),
        },
        "dtypes": {
            dtype: {
                "truncated_encoder": asdict(encoders[f"truncated {dtype}"]),
                "head": [
                    head_share(count, heads[f"{dtype} {count}"], encoders[f"truncated {dtype}"])
                    for count in sizes.cluster_counts
                ],
                "tokens_at_threshold": clustered[dtype].num_tokens.tolist(),
            }
            for dtype in models
        },
        "same_centres_in_both_dtypes": [
            torch.equal(a[a >= 0], b[b >= 0])
            for a, b in zip(clustered["float32"].centers, clustered["bfloat16"].centers, strict=True)
        ],
    }


def markdown_report(results: dict) -> str:
    """The results as a short markdown page."""
    machine, settings, encoder, dtypes = (results[key] for key in ("machine", "settings", "encoder", "dtypes"))
    sizes, images = settings["sizes"], settings["images"]
    num_samples = len(list(SAMPLE_IMAGES.glob("*.png")))
    float32, bfloat16 = dtypes["float32"], dtypes["bfloat16"]

    def timed(timing: dict) -> str:
        return f"{format_seconds(timing['seconds_per_image'])} ({timing['repeats']} rep.)"

    lines = [
        "# Vision encoder stopped at the feature layer; head share; float32 vs bfloat16",
        "",
        f"SigLIP encoder {sizes['encoder']['image_size']}px / patch {sizes['encoder']['patch_size']}, "
        f"{sizes['encoder']['num_hidden_layers']} layers of width {sizes['encoder']['hidden_size']}; merger width "
        f"{sizes['width']}, token width {sizes['token_size']}. {len(images)} of the {num_samples} sample images "
        f"({', '.join(images)}) per call (`--images`: fewer keep a run on a shared machine within minutes); "
        f"{settings['inputs']}. One warm-up call, then the median of the timed repeats (count in brackets), "
        f"in {settings['clock']} per image; calls compared are timed in alternation in one process.",
        "",
        "**The machine was shared**: another job was training on the same 2 CPUs throughout and this run was "
        f"`nice -n 19` (load averages {', '.join(f'{v:.1f}' for v in machine['load_average_at_start'])} at start, "
        f"{', '.join(f'{v:.1f}' for v in machine['load_average_at_end'])} at end; whole run {machine['run_seconds']} "
        "s of wall time). Wall time then mostly measures how long the scheduler left this process waiting, so the "
        "calls are timed in CPU time unless `--clock wall` is given; the ratios, taken within one process in "
        "alternation, are the numbers to read.",
        "",
        f"## Encoder (hidden state {settings['feature_layer']}), float32",
        "",
        "| encoder | runs | per image | ratio |",
        "|---|---|---:|---:|",
        f"| whole, for its hidden states | every layer, the final norm, the pooling head | {timed(encoder['whole'])} "
        "| 1 |",
        f"| stopped at the feature layer | {encoder['layers_run']} layers | {timed(encoder['truncated'])} | "
        f"**{encoder['truncated_over_whole']:.3f}** |",
        "",
        f"Features identical bit for bit: {encoder['identical_features']}.",
        "",
        "## Tokenizer head (clustering + merger) as a share of the whole tokenizer (truncated encoder + head)",
        "",
        "| tokens / image | head, float32 | share | head, bfloat16 | share |",
        "|---:|---:|---:|---:|---:|",
    ]
    for head32, head16 in zip(float32["head"], bfloat16["head"], strict=True):
        lines.append(
            f"| {head32['tokens_per_image']} | {timed(head32)} | {100 * head32['share_of_tokenizer']:.1f}% "
            f"| {timed(head16)} | {100 * head16['share_of_tokenizer']:.1f}% |"
        )
    lines += [
        "",
        "## float32 vs bfloat16 (the same weights rounded)",
        "",
        "| part | float32 | bfloat16 | bfloat16 / float32 |",
        "|---|---:|---:|---:|",
    ]
    rows = [("truncated encoder", float32["truncated_encoder"], bfloat16["truncated_encoder"])]
    rows += [
        (f"head, {head32['tokens_per_image']} tokens", head32, head16)
        for head32, head16 in zip(float32["head"], bfloat16["head"], strict=True)
    ]
    for name, timing32, timing16 in rows:
        ratio = timing16["seconds_per_image"] / timing32["seconds_per_image"]
        lines.append(f"| {name} | {timed(timing32)} | {timed(timing16)} | {ratio:.3f} |")
    lines += [
        "",
        f"Tokens per image at the default threshold ({settings['cluster_threshold']}, no pinned count): "
        f"{float32['tokens_at_threshold']} in float32, {bfloat16['tokens_at_threshold']} in bfloat16; same cluster "
        f"centres: {results['same_centres_in_both_dtypes']}.",
        "",
        f"Machine: {machine['cpu_model']} ({', '.join(machine['cpu_bf16_flags']) or 'no bf16 flags'}), "
        f"{machine['logical_cpus']} logical CPUs, torch {machine['torch']} ({machine['torch_threads']} threads), "
        f"transformers {machine['transformers']}, Python {machine['python']}.",
        "",
    ]
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=3, help="how many of the 3 sample images, in one batch")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement after warm-up")
    parser.add_argument(
        "--budget", type=float, default=90.0, help="seconds per measurement; slow ones get fewer repeats (>= 1)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="cpu",
        help="cpu: this process's CPU time (default); wall: wall time",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run in seconds")
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help=f"where results go (default {RESULTS_DIR}; a temporary directory with --quick)",
    )
    args = parser.parse_args()
    if args.images < 1 or args.repeats < 1:
        parser.error("--images and --repeats must be >= 1")
    return args


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args()
    output_dir = args.output_dir or (Path(tempfile.mkdtemp(prefix="setok_bench_")) if args.quick else RESULTS_DIR)
    results = run(QUICK if args.quick else FULL, args.images, args.repeats, args.budget, args.seed, args.clock)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "encoder_truncation.json").write_text(json.dumps(results, indent=2) + "\n")
    report = markdown_report(results)
    (output_dir / "encoder_truncation.md").write_text(report)
    print(report)
    logger.info("results written to %s", output_dir)


if __name__ == "__main__":
    main()
