"""How fast the detokenizer's U-Net learns to read its tokens: a fresh one trained on frozen tokens.

A detokenizer that ignores its tokens still denoises well at low noise, where the noisy image gives the answer
away; only at high noise must it draw from the tokens. Here a fresh U-Net of the model's own detokenizer config
trains for a few hundred steps on frozen token sets of world seed 0, and is measured on seed 1 at high noise by its
one-step image prediction (PSNR against the image) and by how much worse its loss gets with another image's tokens
(1 = the tokens are ignored). The token sets are the tokenizer's own, or an **oracle**: the same regions (the
tokenizer's clusters), each token replaced by an exact summary of its region (centroid, spread, area, mean
colour). If even the oracle's sets are not read, the U-Net, not the tokens, is what stops reconstruction.

Usage:
    python benchmarks/benchmark_detokenizer_conditioning.py                  # the shipped model, 300 steps
    python benchmarks/benchmark_detokenizer_conditioning.py --steps 100 --train-scenes 400
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from benchmark_token_content import load_parts
from machine import machine_info
from PIL import Image
from tqdm import tqdm

from transformers_setok import (
    SetokDetokenizer,
    SetokDetokenizerConfig,
    SetokImageProcessor,
    SetokModel,
    shapes_world,
)
from transformers_setok.cli.demo import SHIPPED_MODEL

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TIMESTEPS = (999, 700)
VARIANTS = (("tokens", "uniform"), ("oracle", "uniform"), ("oracle", "high"))


def oracle_tokens(
    pixel_values: torch.Tensor, assignment: torch.LongTensor, token_mask: torch.BoolTensor, width: int
) -> torch.Tensor:
    """Each token replaced by its region's centroid, spread (in `[-1, 1]` image coordinates), area and mean colour,
    zero-padded to the token width: everything a decoder needs to paint the region as an ellipse."""
    batch, num_patches = assignment.shape
    side = int(num_patches**0.5)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, side), torch.linspace(-1, 1, side), indexing="ij")
    coordinates = torch.stack([ys.flatten(), xs.flatten()], dim=-1)  # (patches, 2)
    colours = torch.nn.functional.adaptive_avg_pool2d(pixel_values, side).flatten(2).transpose(1, 2)
    membership = torch.nn.functional.one_hot(assignment.clamp(min=0), token_mask.shape[1]).float()
    membership = membership * (assignment >= 0)[..., None]  # (batch, patches, tokens)
    counts = membership.sum(dim=1).clamp(min=1)[..., None]
    centroid = membership.transpose(1, 2) @ coordinates / counts
    spread = (membership.transpose(1, 2) @ coordinates**2 / counts - centroid**2).clamp(min=0).sqrt()
    colour = membership.transpose(1, 2) @ colours / counts
    summary = torch.cat([centroid, spread, counts / num_patches, colour], dim=-1) * 3  # about unit scale
    summary = torch.nn.functional.pad(summary, (0, width - summary.shape[-1]))
    return summary * token_mask[..., None]


def token_sets(
    setok: SetokModel, seed: int, num_scenes: int, batch_size: int = 100
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.BoolTensor]]:
    """Per token source ("tokens": the tokenizer's, "oracle"): a seed's pixel values, token sets padded to
    `max_tokens`, and their masks; one tokenizer pass serves both."""
    size = setok.config.vision_config.image_size
    image_processor = SetokImageProcessor(size={"height": size, "width": size})
    scenes = list(shapes_world(seed, num_scenes, size, tasks=("captions",))["captions"])
    max_tokens = setok.config.max_tokens
    images, tokens, oracles, masks = [], [], [], []
    for start in range(0, num_scenes, batch_size):
        pixel_values = image_processor([s["image"] for s in scenes[start : start + batch_size]], return_tensors="pt")
        pixel_values = pixel_values["pixel_values"]
        with torch.inference_mode():
            out = setok(pixel_values)
        padding = max_tokens - out.tokens.shape[1]
        mask = torch.nn.functional.pad(out.token_mask, (0, padding))
        images.append(pixel_values)
        tokens.append(torch.nn.functional.pad(out.tokens, (0, 0, 0, padding)))
        oracles.append(oracle_tokens(pixel_values, out.assignment, mask, setok.config.token_size))
        masks.append(mask)
    images, masks = torch.cat(images), torch.cat(masks)
    return {"tokens": (images, torch.cat(tokens), masks), "oracle": (images, torch.cat(oracles), masks)}


def train_fresh(
    config: SetokDetokenizerConfig, data: tuple[torch.Tensor, ...], steps: int, timesteps: str, batch_size: int = 16
) -> tuple[SetokDetokenizer, float]:
    """A fresh detokenizer of `config` trained on frozen token sets; returns it and the seconds it took."""
    torch.manual_seed(0)
    detokenizer = SetokDetokenizer(config).train()
    optimizer = torch.optim.AdamW(detokenizer.parameters(), lr=1e-3)
    images, tokens, masks = data
    num_timesteps = detokenizer.noise_scheduler.config.num_train_timesteps
    start = time.perf_counter()
    for _ in tqdm(range(steps), desc=f"training ({timesteps} timesteps)", leave=False):
        index = torch.randint(0, len(images), (batch_size,))
        drawn = None
        if timesteps == "high":
            drawn = torch.randint(int(0.95 * num_timesteps), num_timesteps, (batch_size,))
        loss = detokenizer(images[index], tokens[index], masks[index], timesteps=drawn).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return detokenizer.eval(), time.perf_counter() - start


def measure(detokenizer: SetokDetokenizer, data: tuple[torch.Tensor, ...]) -> tuple[dict[str, float], dict]:
    """At each of `TIMESTEPS`: the one-step prediction's PSNR (dB, images in `[0, 1]`) and the loss with the next
    image's tokens over the loss with the image's own; and the predictions at the first timestep."""
    images, tokens, masks = data
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    other = torch.roll(torch.arange(len(images)), 1)
    metrics, predictions = {}, {}
    with torch.inference_mode():
        for t in TIMESTEPS:
            timesteps = torch.full((len(images),), t)
            own = detokenizer(images, tokens, masks, noise=noise, timesteps=timesteps)
            swapped = detokenizer(images, tokens[other], masks[other], noise=noise, timesteps=timesteps)
            predictions[t] = own.model_output.clamp(-1, 1)
            mse = ((predictions[t] - images) ** 2).mean() / 4  # [-1, 1] -> [0, 1]
            metrics[f"psnr_t{t}"] = float(10 * torch.log10(1 / mse))
            metrics[f"ratio_t{t}"] = float(swapped.loss / own.loss)
    return metrics, predictions[TIMESTEPS[0]]


def picture(rows: list[tuple[str, torch.Tensor]], path: Path, columns: int = 10) -> None:
    """One row per variant (the images first), scaled up 2x."""

    def strip(images: torch.Tensor) -> np.ndarray:
        pixels = ((images[:columns].permute(0, 2, 3, 1).numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)
        return np.concatenate(list(pixels), axis=1)

    grid = np.concatenate([strip(images) for _, images in rows], axis=0)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(SHIPPED_MODEL), help="a Setokim or stage-1 folder")
    parser.add_argument("--steps", type=int, default=300, help="training steps of each fresh U-Net")
    parser.add_argument("--train-scenes", type=int, default=1600)
    parser.add_argument("--test-scenes", type=int, default=64)
    args = parser.parse_args()
    setok, shipped = load_parts(args.model)
    train, test = token_sets(setok, 0, args.train_scenes), token_sets(setok, 1, args.test_scenes)
    data = {source: (train[source], test[source]) for source in train}
    reference, reference_pictures = measure(shipped, data["tokens"][1])
    rows = [{"detokenizer": "the model's own (trained in stage 1)", "tokens": "tokens", **reference}]
    pictures = [("images", data["tokens"][1][0]), ("model's own", reference_pictures)]
    for source, timesteps in VARIANTS:
        detokenizer, seconds = train_fresh(shipped.config, data[source][0], args.steps, timesteps)
        metrics, predictions = measure(detokenizer, data[source][1])
        label = f"fresh, {args.steps} steps, {timesteps} timesteps"
        rows.append({"detokenizer": label, "tokens": source, **metrics, "train_seconds": round(seconds, 1)})
        pictures.append((f"{source}, {timesteps}", predictions))
        print(rows[-1], flush=True)
    report = {"model": args.model, "steps": args.steps, "rows": rows, "machine": machine_info()}
    lines = [
        "# Does the detokenizer read its tokens?",
        "",
        f"Fresh U-Nets of the model's detokenizer config trained {args.steps} steps (batch 16, AdamW 1e-3) on frozen "
        f"token sets of {args.train_scenes} scenes of world seed 0, measured on {args.test_scenes} scenes of seed 1: "
        "the one-step image prediction's PSNR at timestep t, and the loss with another image's tokens over the loss "
        "with the image's own (1 = tokens ignored). *oracle* = each token is its region's exact centroid, spread, "
        "area and mean colour; *high* = trained on the top 5% of timesteps only. "
        "Command: `python benchmarks/benchmark_detokenizer_conditioning.py`.",
        "",
        "| detokenizer | tokens | PSNR t=999 | other/own t=999 | PSNR t=700 | other/own t=700 |",
        "|---|---|---:|---:|---:|---:|",
        *(
            f"| {r['detokenizer']} | {r['tokens']} | {r['psnr_t999']:.2f} | {r['ratio_t999']:.3f} | "
            f"{r['psnr_t700']:.2f} | {r['ratio_t700']:.3f} |"
            for r in rows
        ),
        "",
        "`detokenizer_conditioning.png`: the images, then each row's one-step predictions at t=999: "
        + "; ".join(name for name, _ in pictures[1:])
        + ".",
        "",
    ]
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "detokenizer_conditioning.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS_DIR / "detokenizer_conditioning.md").write_text("\n".join(lines))
    picture(pictures, RESULTS_DIR / "detokenizer_conditioning.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
