"""Benchmark the SeTok tokenizer head (clustering + token merger, vision encoder excluded).

The batched head (`SetokModel.tokenize_features`: one padded tensor program for the whole batch) is
timed against a reference with the structure of the official research code: for each image, cluster
that image alone, run the merger's inner encoder on each cluster's member patches alone (batch of 1,
full attention among the members), mean-pool, stack, run the inter encoder on that image's tokens,
then the output layer. The reference calls the model's own modules, so both give the same tokens.

Both run in one process at SigLIP-so400m sizes (27x27 patches of width 1152, merger width 1152, token
width 4096, 2 heads, 2 inner and 2 inter layers, MLP 4096) on random features (seeded `torch.randn`),
in two regimes: about 64 clusters per image and one cluster per patch. The token count is pinned with
`min_tokens = max_tokens`. A random-weight SigLIP-so400m encoder forward (`output_hidden_states=True`,
as the model calls it) is timed too, so the head's cost can be read as a fraction of the encoder's.

Usage:
    python benchmarks/benchmark_tokenizer_head.py                # full run, writes benchmarks/results/
    python benchmarks/benchmark_tokenizer_head.py --quick        # smoke run on small sizes (a few seconds)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from machine import machine_info  # noqa: E402
from transformers import SiglipVisionConfig  # noqa: E402

from transformers_setok import SetokConfig  # noqa: E402
from transformers_setok.clustering import density_peak_clustering  # noqa: E402
from transformers_setok.modeling_setok import SetokModel, sincos_position_code  # noqa: E402

logger = logging.getLogger("benchmark_tokenizer_head")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SPEEDUP_TARGETS = (4.0, 15.0)  # few clusters, one cluster per patch
HEAD_FRACTION_TARGET = 0.10


@dataclass(frozen=True)
class Sizes:
    """Model and input sizes of one benchmark setting."""

    grid: int
    width: int
    intermediate_size: int
    token_size: int
    cluster_counts: tuple[int, int]
    encoder: dict[str, int] = field(default_factory=dict)
    num_attention_heads: int = 2
    inner_layers: int = 2
    inter_layers: int = 2


FULL = Sizes(
    grid=27,
    width=1152,
    intermediate_size=4096,
    token_size=4096,
    cluster_counts=(64, 27 * 27),
    encoder={
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "image_size": 384,
        "patch_size": 14,
    },
)
QUICK = Sizes(
    grid=8,
    width=64,
    intermediate_size=128,
    token_size=128,
    cluster_counts=(8, 8 * 8),
    encoder={
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 112,
        "patch_size": 14,
    },
)


@dataclass
class Timing:
    """Median seconds per image over `repeats` timed calls (after one warm-up call)."""

    seconds_per_image: float
    repeats: int
    call_seconds: list[float]


def build_model(sizes: Sizes) -> SetokModel:
    """A random-weight SeTok tokenizer whose encoder is SigLIP (so400m sizes for the full run)."""
    config = SetokConfig(
        vision_config=SiglipVisionConfig(**sizes.encoder),
        hidden_size=sizes.width,
        num_attention_heads=sizes.num_attention_heads,
        inner_layers=sizes.inner_layers,
        inter_layers=sizes.inter_layers,
        intermediate_size=sizes.intermediate_size,
        token_size=sizes.token_size,
    )
    return SetokModel(config).eval()


def reference_tokenize(
    model: SetokModel, patch_features: torch.Tensor, grid_size: tuple[int, int], num_tokens: int
) -> list[torch.Tensor]:
    """One image at a time, one cluster at a time, with the model's own clustering and merger weights.

    Returns each image's `(num_tokens, token_size)` tokens.
    """
    config, merger = model.config, model.merger
    position = sincos_position_code(*grid_size, patch_features.shape[-1], patch_features.dtype, patch_features.device)
    tokens = []
    for image_features in patch_features:
        features = image_features + position
        clusters = density_peak_clustering(
            features[None], config.cluster_k, config.cluster_threshold, min_tokens=num_tokens, max_tokens=num_tokens
        )
        hidden = model.input_projection(features)
        assignment = clusters.assignment[0]
        pooled = []
        for cluster in range(int(clusters.num_tokens[0])):
            members = hidden[assignment == cluster][None]
            everyone = torch.ones(1, members.shape[1], members.shape[1], dtype=torch.bool, device=hidden.device)
            pooled.append(merger.inner_encoder(members, everyone)[0].mean(dim=1))
        cluster_tokens = torch.cat(pooled)[None]
        everyone = torch.ones(
            1, cluster_tokens.shape[1], cluster_tokens.shape[1], dtype=torch.bool, device=hidden.device
        )
        tokens.append(merger.out(merger.inter_encoder(cluster_tokens, everyone)[0])[0])
    return tokens


def time_side_by_side(
    calls: dict[str, Callable[[], Any]],
    num_images: int,
    repeats: int,
    budget_s: float,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[dict[str, Timing], dict[str, Any]]:
    """Warm each call up once, then time them in alternation, so background load hits all of them alike.

    Each call gets up to `repeats` timed runs (fewer, at least one, when its runs would overrun `budget_s`).
    `clock` is wall time by default; `time.process_time` counts the CPU time of this process only, which other
    processes on a shared machine inflate far less. Returns the timings and each call's warm-up result.
    """
    results, planned = {}, {}
    for name, call in calls.items():
        logger.info("  warm-up: %s", name)
        start = clock()
        results[name] = call()
        planned[name] = max(1, min(repeats, int(budget_s // max(clock() - start, 1e-9))))
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for repeat in range(max(planned.values())):
        for name, call in calls.items():
            if repeat < planned[name]:
                logger.info("  repeat %d/%d: %s", repeat + 1, planned[name], name)
                start = clock()
                call()
                seconds[name].append(clock() - start)
    timings = {name: Timing(statistics.median(runs) / num_images, len(runs), runs) for name, runs in seconds.items()}
    return timings, results


def max_token_difference(batched: torch.Tensor, num_tokens: torch.Tensor, reference: list[torch.Tensor]) -> float:
    """Largest absolute difference between each image's batched token rows and its reference tokens."""
    difference = 0.0
    for image, expected in enumerate(reference):
        actual = batched[image, : int(num_tokens[image])]
        if actual.shape != expected.shape:
            return float("inf")
        difference = max(difference, (actual - expected).abs().max().item())
    return difference


def run(sizes: Sizes, batch_size: int, encoder_batch_size: int, repeats: int, budget_s: float, seed: int) -> dict:
    """Measure both head implementations in both regimes, and the encoder; return the results as a dict."""
    machine = {**machine_info(), "load_average_1min_before": os.getloadavg()[0]}
    torch.manual_seed(seed)
    logger.info("building the model (random weights)")
    model = build_model(sizes)
    grid_size = (sizes.grid, sizes.grid)
    generator = torch.Generator().manual_seed(seed)
    patch_features = torch.randn(batch_size, sizes.grid**2, sizes.width, generator=generator)
    positioned = patch_features + sincos_position_code(*grid_size, sizes.width, torch.float32, torch.device("cpu"))
    regimes = []
    with torch.inference_mode():
        for count, target in zip(sizes.cluster_counts, SPEEDUP_TARGETS):
            logger.info("%d clusters per image", count)
            timings, outputs = time_side_by_side(
                {
                    "batched head": lambda count=count: model.tokenize_features(
                        patch_features, grid_size, min_tokens=count, max_tokens=count
                    ),
                    "batched clustering alone": lambda count=count: density_peak_clustering(
                        positioned,
                        model.config.cluster_k,
                        model.config.cluster_threshold,
                        min_tokens=count,
                        max_tokens=count,
                    ),
                    "reference": lambda count=count: reference_tokenize(model, patch_features, grid_size, count),
                },
                batch_size,
                repeats,
                budget_s,
            )
            batched, clustering, reference = (
                timings[name] for name in ("batched head", "batched clustering alone", "reference")
            )
            output, expected = outputs["batched head"], outputs["reference"]
            difference = max_token_difference(output.tokens, output.num_tokens, expected)
            speedup = reference.seconds_per_image / batched.seconds_per_image
            regimes.append(
                {
                    "clusters_per_image": count,
                    "batched": asdict(batched),
                    "batched_clustering_only": asdict(clustering),
                    "reference": asdict(reference),
                    "speedup": speedup,
                    "speedup_target": target,
                    "meets_speedup_target": speedup >= target,
                    "max_abs_difference": difference,
                    "max_abs_token": output.tokens.abs().max().item(),
                    "equal_within_1e-4": difference <= 1e-4,
                }
            )
            logger.info("%d clusters: speedup %.2fx, max abs difference %.2e", count, speedup, difference)

        logger.info("vision encoder forward on %d images", encoder_batch_size)
        pixel_values = torch.randn(
            encoder_batch_size, 3, sizes.encoder["image_size"], sizes.encoder["image_size"], generator=generator
        )
        timings, _ = time_side_by_side(
            {"encoder": lambda: model.get_patch_features(pixel_values)}, encoder_batch_size, repeats, budget_s
        )
        encoder = timings["encoder"]
    for regime in regimes:
        fraction = regime["batched"]["seconds_per_image"] / encoder.seconds_per_image
        regime["head_fraction_of_encoder"] = fraction
        regime["meets_fraction_target"] = fraction <= HEAD_FRACTION_TARGET
    machine["load_average_1min_after"] = os.getloadavg()[0]
    return {
        "machine": machine,
        "settings": {
            "sizes": asdict(sizes),
            "batch_size": batch_size,
            "encoder_batch_size": encoder_batch_size,
            "repeats": repeats,
            "budget_seconds_per_measurement": budget_s,
            "seed": seed,
            "inputs": "random features and pixels (seeded torch.randn), random weights; torch.inference_mode, eval",
            "cluster_k": model.config.cluster_k,
            "cluster_threshold": model.config.cluster_threshold,
            "token_count_control": "min_tokens = max_tokens = clusters_per_image",
        },
        "regimes": regimes,
        "encoder": {"model": "SiglipVisionModel, output_hidden_states=True", **asdict(encoder)},
        "head_fraction_target": HEAD_FRACTION_TARGET,
    }


def format_seconds(seconds: float) -> str:
    """`1.23 s` from one second up, `456 ms` below."""
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1e3:.3g} ms"


def markdown_table(results: dict) -> str:
    """The results as a short markdown report."""
    machine, settings = results["machine"], results["settings"]
    sizes = settings["sizes"]
    encoder = results["encoder"]
    lines = [
        "# Tokenizer head: batched vs per-image, per-cluster reference",
        "",
        f"{sizes['grid']}x{sizes['grid']} patches of width {sizes['width']}, merger width {sizes['width']}, "
        f"token width {sizes['token_size']}, {sizes['num_attention_heads']} heads, {sizes['inner_layers']} inner + "
        f"{sizes['inter_layers']} inter layers, MLP {sizes['intermediate_size']}. Batch of {settings['batch_size']} "
        f"images; {settings['inputs']}. Median of the timed repeats after one warm-up, seconds per image.",
        "",
        "| clusters / image | batched head | of which clustering | reference | speedup (target) "
        "| max abs diff | head / encoder (target) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for regime in results["regimes"]:
        lines.append(
            f"| {regime['clusters_per_image']} | {format_seconds(regime['batched']['seconds_per_image'])} "
            f"| {format_seconds(regime['batched_clustering_only']['seconds_per_image'])} "
            f"| {format_seconds(regime['reference']['seconds_per_image'])} ({regime['reference']['repeats']} rep.) "
            f"| {regime['speedup']:.2f}x (>= {regime['speedup_target']:.0f}x) "
            f"| {regime['max_abs_difference']:.1e} "
            f"| {100 * regime['head_fraction_of_encoder']:.1f}% (<= {100 * results['head_fraction_target']:.0f}%) |"
        )
    lines += [
        "",
        f"Vision encoder ({encoder['model']}, {settings['encoder_batch_size']} images, {encoder['repeats']} rep.): "
        f"{format_seconds(encoder['seconds_per_image'])} per image.",
        "",
        f"Machine: {machine['cpu_model']}, {machine['logical_cpus']} logical CPUs, torch {machine['torch']} "
        f"({machine['torch_threads']} threads), transformers {machine['transformers']}, "
        f"Python {machine['python']}. 1-minute load average {machine['load_average_1min_before']:.2f} before, "
        f"{machine['load_average_1min_after']:.2f} after the run (more than the thread count means other "
        "processes shared the CPUs; the implementations are timed in alternation so they share it alike).",
        "",
    ]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Bar chart of seconds per image: batched head, reference head, with the encoder as a line."""
    regimes = results["regimes"]
    labels = [f"{regime['clusters_per_image']} clusters / image" for regime in regimes]
    batched = [regime["batched"]["seconds_per_image"] for regime in regimes]
    reference = [regime["reference"]["seconds_per_image"] for regime in regimes]
    encoder = results["encoder"]["seconds_per_image"]
    positions = range(len(regimes))
    width = 0.38
    figure, axis = plt.subplots(figsize=(7.5, 4.5))
    batched_bars = axis.bar([p - width / 2 for p in positions], batched, width, label="batched head", color="#2a7ab9")
    reference_bars = axis.bar(
        [p + width / 2 for p in positions], reference, width, label="per-image, per-cluster reference", color="#d9822b"
    )
    axis.bar_label(batched_bars, [format_seconds(value) for value in batched], padding=2, fontsize=9)
    axis.bar_label(reference_bars, [format_seconds(value) for value in reference], padding=2, fontsize=9)
    axis.axhline(
        encoder, color="#555555", linestyle="--", linewidth=1.2, label=f"vision encoder ({format_seconds(encoder)})"
    )
    top = max(reference + [encoder]) * 1.25
    for position, regime in zip(positions, regimes):
        axis.text(
            position,
            top * 0.93,
            f"{regime['speedup']:.1f}x faster (target {regime['speedup_target']:.0f}x)",
            ha="center",
            fontsize=10,
            weight="bold",
        )
    axis.set_ylim(0, top)
    axis.set_xticks(list(positions), labels)
    axis.set_ylabel("seconds per image (lower is better)")
    machine = results["machine"]
    axis.set_title(
        f"SeTok tokenizer head, batch of {results['settings']['batch_size']} "
        f"({machine['cpu_model']}, {machine['torch_threads']} threads)",
        fontsize=11,
    )
    axis.legend(loc="upper left", fontsize=9, bbox_to_anchor=(0, 0.88))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=8, help="images per head call (default 8)")
    parser.add_argument(
        "--encoder-batch-size", type=int, default=None, help="images per encoder call (default: --batch-size)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement after warm-up")
    parser.add_argument(
        "--budget", type=float, default=120.0, help="seconds per measurement; slow ones get fewer repeats (>= 1)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run in a few seconds")
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help=f"where results go (default {RESULTS_DIR}; a temporary directory with --quick)",
    )
    args = parser.parse_args()
    if args.batch_size < 1 or args.repeats < 1:
        parser.error("--batch-size and --repeats must be >= 1")
    return args


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args()
    sizes = QUICK if args.quick else FULL
    output_dir = args.output_dir or (Path(tempfile.mkdtemp(prefix="setok_bench_")) if args.quick else RESULTS_DIR)
    encoder_batch_size = args.encoder_batch_size or args.batch_size
    results = run(sizes, args.batch_size, encoder_batch_size, args.repeats, args.budget, args.seed)

    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "tokenizer_head.json").write_text(json.dumps(results, indent=2) + "\n")
    report = markdown_table(results)
    (output_dir / "tokenizer_head.md").write_text(report)
    plot(results, output_dir / "tokenizer_head.png")
    print(report)
    logger.info("results written to %s", output_dir)


if __name__ == "__main__":
    main()
