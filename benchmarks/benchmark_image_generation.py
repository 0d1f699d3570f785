"""Benchmark Setokim's vision-token loop on the KV cache against Emu2's structure (the prefix re-run per token).

One Setokim with random weights at the sizes of the understanding benchmark (SigLIP-so400m tokenizer with
paper-size merger and 4096-wide tokens, a ~1.1B Llama, `mlp2x_gelu` projector and vision head) writes N
vision tokens (16, 64, 256) after a 32-token text prompt. Its LM head is wrapped so it never closes the
image, so each run writes exactly N tokens:

* cached: `generate_images(render=False)`, one prefill, then one LLM step per token on the KV cache;
* uncached: the same tokens with the whole sequence (prompt and every token so far) re-run for each new token,
  as Emu2's generation loop does;
* text decode: greedy `generate` of N text tokens on the same prompt and LLM, for the cost of one text step.

Per vision token: `(cached(N) - cached(1)) / (N - 1)`; per text token: `(generate(N) - generate(1)) / (N - 1)`;
their ratio is the cost of one vision token against one text decode step (target: within 1.3x). Each
measurement is the median over `--repeats` runs (the uncached loop at 256 tokens runs once: it takes minutes).
Rendering is left out (see `benchmark_detokenizer.py`). Float32, as on this CPU bfloat16 is slower.

Usage:
    python benchmarks/benchmark_image_generation.py          # full sizes, writes benchmarks/results/
    python benchmarks/benchmark_image_generation.py --quick  # tiny sizes, a smoke run in seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from machine import machine_info  # noqa: E402
from torch import nn  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from transformers_setok import SetokConfig, SetokimConfig, SetokimForConditionalGeneration  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
IMAGE_TOKEN_ID, IMAGE_START_ID, IMAGE_END_ID = 32000, 32001, 32002
PROMPT_TOKENS = 32
TEXT_STEP_TARGET = 1.3

FULL = dict(
    vision=dict(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=27,
        num_attention_heads=16,
        image_size=384,
        patch_size=14,
    ),
    merger=dict(
        hidden_size=1152,
        token_size=4096,
        num_attention_heads=2,
        inner_layers=2,
        inter_layers=2,
        intermediate_size=4096,
    ),
    text=dict(
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=8192,
        vocab_size=32003,
        max_position_embeddings=4096,
    ),
    counts=(16, 64, 256),
)
QUICK = dict(
    vision=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=8
    ),
    merger=dict(token_size=64, num_attention_heads=2, intermediate_size=64),
    text=dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=32003,
        max_position_embeddings=1024,
    ),
    counts=(4, 8, 16),
)


class NeverClose(nn.Module):
    """The LM head, with `[/Img]` never chosen over another vision token: every run writes the budget."""

    def __init__(self, head: nn.Linear) -> None:
        super().__init__()
        self.head = head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden)
        return logits.index_fill(-1, torch.tensor([IMAGE_END_ID], device=logits.device), -torch.inf)


def build_model(sizes: dict) -> SetokimForConditionalGeneration:
    config = SetokimConfig(
        setok_config=SetokConfig(
            vision_config=dict(model_type="siglip_vision_model", **sizes["vision"]), **sizes["merger"]
        ),
        text_config=dict(model_type="llama", pad_token_id=0, bos_token_id=1, eos_token_id=2, **sizes["text"]),
        image_token_id=IMAGE_TOKEN_ID,
        image_start_token_id=IMAGE_START_ID,
        image_end_token_id=IMAGE_END_ID,
        vision_output_head=True,
    )
    torch.manual_seed(0)
    model = SetokimForConditionalGeneration(config).eval()
    model.lm_head = NeverClose(model.lm_head)
    return model


@torch.no_grad()
def uncached_loop(model: SetokimForConditionalGeneration, prompt: torch.Tensor, count: int) -> torch.Tensor:
    """Emu2's structure: the whole sequence so far is run again for every new vision token."""
    llm, embed = model.model.language_model, model.get_input_embeddings()
    sequence = embed(torch.cat([prompt, torch.tensor([[IMAGE_START_ID]])], dim=1))
    tokens = []
    for _ in range(count):
        token = model.vision_head(llm(inputs_embeds=sequence, use_cache=False).last_hidden_state[:, -1])
        tokens.append(token)
        sequence = torch.cat([sequence, model.model.multi_modal_projector(token)[:, None]], dim=1)
    return torch.stack(tokens, dim=1)


def median_seconds(call: Callable[[], object], repeats: int) -> float:
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a smoke run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (median)")
    parser.add_argument(
        "--counts", type=int, nargs="+", help="vision-token counts (default: 16 64 256; quick: 4 8 16)"
    )
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    if args.counts:
        sizes = {**sizes, "counts": tuple(args.counts)}
    model = build_model(sizes)
    prompt = torch.randint(3, 32000, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    prompt[0, 0] = 1

    def cached(count: int) -> torch.Tensor:
        return model.generate_images(prompt, max_image_tokens=count, render=False).tokens

    def text(count: int) -> torch.Tensor:
        return model.generate(prompt, max_new_tokens=count, min_new_tokens=count, do_sample=False)

    cached(2), text(2)  # warm-up
    one_vision, one_text = (
        median_seconds(lambda: cached(1), args.repeats),
        median_seconds(lambda: text(1), args.repeats),
    )
    rows = []
    for count in tqdm(sizes["counts"], desc="vision tokens"):
        with torch.no_grad():
            difference = (cached(count) - uncached_loop(model, prompt, count)).abs().max().item()
        cached_s = median_seconds(lambda count=count: cached(count), args.repeats)
        uncached_s = median_seconds(
            lambda count=count: uncached_loop(model, prompt, count), 1 if count >= 256 else args.repeats
        )
        text_s = median_seconds(lambda count=count: text(count), args.repeats)
        vision_step, text_step = (cached_s - one_vision) / (count - 1), (text_s - one_text) / (count - 1)
        rows.append(
            dict(
                vision_tokens=count,
                cached_s=cached_s,
                uncached_s=uncached_s,
                speedup=uncached_s / cached_s,
                vision_step_ms=1000 * vision_step,
                text_step_ms=1000 * text_step,
                vision_over_text_step=vision_step / text_step,
                max_token_difference=difference,
            )
        )
        print(
            f"{count:4d} tokens: cached {cached_s:.2f} s, uncached {uncached_s:.2f} s ({uncached_s / cached_s:.1f}x); "
            f"vision step {1000 * vision_step:.1f} ms vs text step {1000 * text_step:.1f} ms "
            f"({vision_step / text_step:.2f}x); tokens agree within {difference:.1e}"
        )
    write_results(rows, sizes, args)


def write_results(rows: list[dict], sizes: dict, args: argparse.Namespace) -> None:
    name = "image_generation_quick" if args.quick else "image_generation"
    RESULTS_DIR.mkdir(exist_ok=True)
    report = dict(machine=machine_info(), sizes={k: v for k, v in sizes.items() if k != "counts"}, rows=rows)
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(report, indent=2))
    lines = [
        "# Vision-token loop: KV cache vs the prefix re-run per token (Emu2's structure)",
        "",
        f"`python benchmarks/benchmark_image_generation.py{' --quick' if args.quick else ''}`; float32, "
        f"{report['machine']['cpu_model']}, {report['machine']['torch_threads']} threads, median of {args.repeats}.",
        "",
        "| vision tokens | cached | uncached | speedup | vision step | text step | vision / text (target <= 1.3) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {r['vision_tokens']} | {r['cached_s']:.2f} s | {r['uncached_s']:.2f} s | {r['speedup']:.1f}x | "
            f"{r['vision_step_ms']:.1f} ms | {r['text_step_ms']:.1f} ms | {r['vision_over_text_step']:.2f}x |"
            for r in rows
        ),
    ]
    (RESULTS_DIR / f"{name}.md").write_text("\n".join(lines) + "\n")
    figure, axis = plt.subplots(figsize=(6, 4))
    counts = [r["vision_tokens"] for r in rows]
    axis.plot(counts, [r["cached_s"] for r in rows], "o-", label="KV cache (Setokim)")
    axis.plot(counts, [r["uncached_s"] for r in rows], "s--", label="prefix re-run per token (Emu2)")
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("vision tokens written")
    axis.set_ylabel("seconds per image")
    axis.set_title("Writing one image's vision tokens")
    axis.legend()
    figure.tight_layout()
    figure.savefig(RESULTS_DIR / f"{name}.png", dpi=120)


if __name__ == "__main__":
    main()
