"""Benchmark the SeTok detokenizer pipeline: sampling time and peak memory per image.

Swept: tokens per image (8, 32, 128, 256, at 10 steps) and DDIM steps (10, 25, 50, at 32 tokens), in pixel
space and in latent space (an `AutoencoderKL` decodes at the end), at two U-Net widths:

* small: block channels (32, 64, 64), cross-attention width 64, 32x32 images (what the tests' scale trains);
* SD-like, scaled down: Stable Diffusion 1.x's U-Net layout (4 levels, 2 layers per block, cross-attention in
  the first three, 8-wide heads, cross-attention width 768) with a fifth of its channels (64, 128, 256, 256);
  its latent space uses an SD-layout VAE (4 levels, factor 8) with a quarter of SD's VAE channels, for
  256x256 images from 32x32x4 latents; its pixel space denoises 64x64 pixels directly.

Full SD 1.x sizes (channels 320-1280, 64x64 latents) would take minutes per image on the shared 2-core CPU
these numbers come from; the scaled width keeps the structure (attention at three resolutions) and the
cross-attention width, so the token-count and step trends carry over.

In the same run, classifier-free guidance as ONE batched U-Net call per step (the pipeline) is timed against
TWO separate calls per step (conditional, then unconditional), with the images compared.

Random weights (seeded), batch of 1 image, guidance scale 3, `torch.inference_mode`, float32, one thread (the
machine is shared; more threads than free cores oversubscribe). Time: median of the timed repeats after one
warm-up. Peak memory: the process's resident-set high-water mark during sampling (Linux `VmHWM`, reset before
each measurement) above the resident set before it, so it counts activations, not weights.

Usage:
    python benchmarks/benchmark_detokenizer.py            # full run, writes benchmarks/results/detokenizer.*
    python benchmarks/benchmark_detokenizer.py --quick    # smoke run on tiny sizes (seconds)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402
from machine import machine_info  # noqa: E402

from transformers_setok import SetokDetokenizer, SetokDetokenizerConfig, SetokDetokenizerPipeline  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TOKEN_COUNTS = (8, 32, 128, 256)  # swept at SWEEP_STEPS steps
STEP_COUNTS = (10, 25, 50)  # swept at SWEEP_TOKENS tokens (sampling time is linear in the steps)
SWEEP_STEPS, SWEEP_TOKENS = 10, 32
TOKEN_SIZE = 256
GUIDANCE_SCALE = 3.0


@dataclass(frozen=True)
class Width:
    """One U-Net width, with the VAE that goes with it in latent space."""

    name: str
    block_out_channels: tuple[int, ...]
    cross_attention_dim: int
    layers_per_block: int
    pixel_sample_size: int
    latent_sample_size: int
    vae_block_out_channels: tuple[int, ...]

    def unet_config(self, latent: bool) -> dict[str, Any]:
        levels = len(self.block_out_channels)
        return dict(
            sample_size=self.latent_sample_size if latent else self.pixel_sample_size,
            in_channels=4 if latent else 3,
            out_channels=4 if latent else 3,
            block_out_channels=list(self.block_out_channels),
            layers_per_block=self.layers_per_block,
            down_block_types=["CrossAttnDownBlock2D"] * (levels - 1) + ["DownBlock2D"],
            up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (levels - 1),
            cross_attention_dim=self.cross_attention_dim,
            attention_head_dim=8,
            norm_num_groups=min(32, self.block_out_channels[0]),
        )

    def vae_config(self) -> dict[str, Any]:
        levels = len(self.vae_block_out_channels)
        return dict(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=list(self.vae_block_out_channels),
            down_block_types=["DownEncoderBlock2D"] * levels,
            up_block_types=["UpDecoderBlock2D"] * levels,
            layers_per_block=2 if levels > 2 else 1,
            norm_num_groups=min(32, self.vae_block_out_channels[0]),
            sample_size=self.latent_sample_size * 2 ** (levels - 1),
        )


SMALL = Width("small", (32, 64, 64), 64, 1, 32, 16, (32, 64))
SD_LIKE = Width("SD-like (1/5 channels)", (64, 128, 256, 256), 768, 2, 64, 32, (32, 64, 128, 128))
QUICK = Width("quick", (8, 16), 16, 1, 8, 8, (8, 8))


class TwoCallPipeline(SetokDetokenizerPipeline):
    """Guidance the unbatched way: the conditional and the unconditional prediction from two U-Net calls."""

    def denoise(self, latents, timestep, hidden_states, attention_mask, guidance_scale):
        if guidance_scale == 1.0:
            return super().denoise(latents, timestep, hidden_states, attention_mask, guidance_scale)
        model_input = self.scheduler.scale_model_input(latents, timestep)
        conditional_states, unconditional_states = hidden_states.chunk(2)
        conditional_mask, unconditional_mask = attention_mask.chunk(2)
        conditional = self.unet(
            model_input, timestep, encoder_hidden_states=conditional_states, encoder_attention_mask=conditional_mask
        ).sample
        unconditional = self.unet(
            model_input,
            timestep,
            encoder_hidden_states=unconditional_states,
            encoder_attention_mask=unconditional_mask,
        ).sample
        return unconditional + guidance_scale * (conditional - unconditional)


def resident_kib(field: str) -> int:
    """`VmRSS` (resident set) or `VmHWM` (its high-water mark) of this process, in KiB."""
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def build_pipelines(width: Width, latent: bool) -> tuple[SetokDetokenizerPipeline, TwoCallPipeline]:
    """The pipeline and its two-call twin over the same random-weight detokenizer."""
    torch.manual_seed(0)
    config = SetokDetokenizerConfig(
        token_size=TOKEN_SIZE,
        unet_config=width.unet_config(latent),
        vae_config=width.vae_config() if latent else None,
    )
    detokenizer = SetokDetokenizer(config).eval()
    pipes = SetokDetokenizerPipeline.from_detokenizer(detokenizer), TwoCallPipeline.from_detokenizer(detokenizer)
    for pipe in pipes:
        pipe.set_progress_bar_config(disable=True)
    return pipes


def sample(pipe, tokens: torch.Tensor, steps: int, latents: torch.Tensor) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    with torch.inference_mode():
        images = pipe(
            tokens, num_inference_steps=steps, guidance_scale=GUIDANCE_SCALE, latents=latents, output_type="pt"
        ).images
    return time.perf_counter() - start, images


def measure(width: Width, latent: bool, num_tokens: int, step_counts, repeats: int) -> list[dict[str, Any]]:
    """Every step count of one width, space and token count, and the batched-vs-two-calls guidance comparison.

    Runs in a fresh process: its first sampling call is the only one that grows the resident set (later ones
    reuse the freed memory), so its high-water mark above the resident set before it is the sampling peak.
    """
    batched, two_calls = build_pipelines(width, latent)
    size = batched.unet.config.sample_size
    latents = torch.randn(1, batched.unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(1))
    tokens = torch.randn(1, num_tokens, TOKEN_SIZE, generator=torch.Generator().manual_seed(num_tokens))
    before = resident_kib("VmRSS")
    sample(batched, tokens, 2, latents)  # warm-up, and the memory peak (the same at any step count)
    peak_mib = (resident_kib("VmHWM") - before) / 1024
    rows = []
    for steps in step_counts:
        seconds = [sample(batched, tokens, steps, latents)[0] for _ in range(repeats)]
        rows.append(dict(width=width.name, space="latent" if latent else "pixel", tokens=num_tokens, steps=steps,
                         image_size=size * batched.vae_scale_factor, seconds_per_image=statistics.median(seconds),
                         peak_memory_mib=peak_mib))  # fmt: skip
    steps = step_counts[0]
    one_time, one_images = sample(batched, tokens, steps, latents)
    two_time, two_images = sample(two_calls, tokens, steps, latents)
    rows[0].update(
        guidance_steps=steps,
        batched_guidance_seconds=one_time,
        two_call_guidance_seconds=two_time,
        two_calls_over_batched=two_time / one_time,
        guidance_max_abs_diff=(one_images - two_images).abs().max().item(),
    )
    return rows


def measure_in_fresh_process(*args: Any) -> list[dict[str, Any]]:
    """`measure(*args)` in a forked child that has never sampled (see `measure` on why)."""
    context = multiprocessing.get_context("fork")
    with context.Pool(1) as pool:
        rows = pool.apply(measure, args)
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def write_results(rows: list[dict[str, Any]], info: dict[str, Any], folder: Path, stem: str = "detokenizer") -> None:
    folder.mkdir(exist_ok=True)
    (folder / f"{stem}.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=2) + "\n")

    lines = [
        "# Detokenizer sampling: time and peak memory per image",
        "",
        "Random-weight SetokDetokenizerPipeline, DDIM, guidance scale 3 (one batched U-Net call per step), batch of "
        f"1, token width {TOKEN_SIZE}, float32, one thread, torch.inference_mode. Median of the timed repeats after "
        "a warm-up; peak memory = resident-set high-water mark during sampling above the resident set before it. "
        "The SD-like width is Stable Diffusion 1.x's U-Net layout with a fifth of its channels (see the script). "
        "Each token count runs in a fresh process; its first sampling call also allocates a roughly constant "
        "~20 MiB of library state (the whole peak at the quick run's tiny sizes), included here.",
        "",
        "| width | space | image | tokens | steps | s / image | ms / step | peak MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['width']} | {row['space']} | {row['image_size']} | {row['tokens']} | {row['steps']} | "
            f"{row['seconds_per_image']:.3f} | {1000 * row['seconds_per_image'] / row['steps']:.1f} | "
            f"{row['peak_memory_mib']:.1f} |"
        )
    lines += [
        "",
        "## Guidance: one batched U-Net call per step vs two separate calls",
        "",
        "| width | space | tokens | steps | batched s | two calls s | two calls / batched | max abs diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if "two_calls_over_batched" in row:
            lines.append(
                f"| {row['width']} | {row['space']} | {row['tokens']} | {row['guidance_steps']} | "
                f"{row['batched_guidance_seconds']:.3f} | {row['two_call_guidance_seconds']:.3f} | "
                f"{row['two_calls_over_batched']:.2f}x | {row['guidance_max_abs_diff']:.1e} |"
            )
    lines += [
        "",
        f"Machine: {info['cpu_model']}, {info['logical_cpus']} logical CPUs, torch {info['torch']} "
        f"({info['torch_threads']} thread), transformers {info['transformers']}, Python {info['python']}. "
        f"1-minute load average {info['load_average_at_start'][0]:.2f} before, {info['load_average_at_end'][0]:.2f} "
        "after the run (above the thread count: other processes shared the CPUs).",
        "",
    ]
    (folder / f"{stem}.md").write_text("\n".join(lines))
    plot(rows, folder / f"{stem}.png")


def plot(rows: list[dict[str, Any]], target: Path) -> None:
    figure, (by_steps, by_tokens, memory) = plt.subplots(1, 3, figsize=(15, 4.2))
    series = sorted({(row["width"], row["space"]) for row in rows})
    for width, space in series:
        mine = [row for row in rows if (row["width"], row["space"]) == (width, space)]
        label = f"{width}, {space}"
        steps_sweep = sorted((row["steps"], row["seconds_per_image"]) for row in mine if row["tokens"] == SWEEP_TOKENS)
        by_steps.plot(*zip(*steps_sweep), marker="o", label=label)
        token_sweep = [row for row in sorted(mine, key=lambda row: row["tokens"]) if row["steps"] == SWEEP_STEPS]
        by_tokens.plot([row["tokens"] for row in token_sweep], [row["seconds_per_image"] for row in token_sweep],
                       marker="o", label=label)  # fmt: skip
        memory.plot([row["tokens"] for row in token_sweep], [row["peak_memory_mib"] for row in token_sweep],
                    marker="o", label=label)  # fmt: skip
    by_steps.set(xlabel="DDIM steps", ylabel="seconds per image", title=f"time vs steps ({SWEEP_TOKENS} tokens)",
                 yscale="log")  # fmt: skip
    by_tokens.set(xlabel="tokens per image", ylabel="seconds per image", title=f"time vs tokens ({SWEEP_STEPS} steps)",
                  xscale="log", yscale="log")  # fmt: skip
    memory.set(xlabel="tokens per image", ylabel="MiB above weights", title="peak sampling memory", xscale="log",
               yscale="log")  # fmt: skip
    for axis in (by_steps, by_tokens, memory):
        axis.grid(alpha=0.3)
    by_steps.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(target, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, two token counts, few steps")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    diffusers_logging.set_verbosity_error()
    info = machine_info()
    if args.quick:
        rows = [
            row
            for latent in (False, True)
            for num_tokens in (8, SWEEP_TOKENS)
            for row in measure_in_fresh_process(QUICK, latent, num_tokens, (SWEEP_STEPS, 20), 1)
        ]
        info["load_average_at_end"] = os.getloadavg()
        folder = Path(tempfile.mkdtemp(prefix="detokenizer_quick_"))
        write_results(rows, info, folder)
        print(f"quick run: {len(rows)} points, written to {folder}")
        return
    rows = [
        row
        for width in (SMALL, SD_LIKE)
        for latent in (False, True)
        for num_tokens in TOKEN_COUNTS
        for row in measure_in_fresh_process(
            width, latent, num_tokens, STEP_COUNTS if num_tokens == SWEEP_TOKENS else (SWEEP_STEPS,), args.repeats
        )
    ]
    info["load_average_at_end"] = os.getloadavg()
    write_results(rows, info, RESULTS_DIR)


if __name__ == "__main__":
    main()
