"""Benchmark Setokim against LLaVA built from the same vision encoder and the same LLM, in one run.

Both models are built with random weights from one SigLIP-so400m vision config (384 px, patch 14:
729 patches, features of the second-to-last layer) and one Llama config of about 1B parameters. The
vision tower, the LLM and the LM head are the SAME modules in both models (shared, so weights are
identical and held once); only the connector differs:

* LLaVA (`transformers.LlavaForConditionalGeneration`, strategy "full", layer -2): its 2-layer GELU
  projector feeds all 729 patch tokens per image into the LLM (`input_ids` hold 729 image-token ids per
  image, as LLaVA's processor would write them).
* Setokim (`SetokimForConditionalGeneration`): density-peak clustering and the token merger (paper
  sizes: width 1152, token width 4096, 2 heads, 2 inner + 2 inter layers, MLP 4096) with a fixed
  64-token budget (`min_tokens = max_tokens = 64`), then an `mlp2x_gelu` projector; `input_ids` hold one
  placeholder per image, wrapped in `[Img]` ... `[/Img]`, and the model expands it.

Per model and per prompt (one image, then four images, each followed by a 32-token question; a BOS
token first) it measures: vision tokens entering the LLM; prefill (one forward over the prompt with
vision encoding, `use_cache=True`, `logits_to_keep=1` as generation does); time to first token
(`generate(max_new_tokens=1)`); decode speed from greedy `generate` of N tokens
(`min_new_tokens=N`): `(N - 1) / (time(N) - time(1))` tokens per second, and as a check the same rate
timed inside each `generate(N)` call (a streamer notes when each token arrives: tokens 2..N over the
time since token 1), which calls of the length of a prefill cannot blur; and memory.

Both models warm up once (one prefill on the first prompt). Each measurement then runs in rounds of one
LLaVA call and one Setokim call, in alternating order, so both see the same machine load (other
processes may share these CPUs: the CPUs they kept busy during every call are read from /proc/stat and
reported). Timings are medians over the rounds: up to `--repeats`, fewer when a further round would end
past `--budget` seconds after the measurement began.

Float32 by default: bfloat16 matmuls are about 5x faster on this CPU (avx512_bf16), but Setokim cannot
run in bfloat16 yet (`torch.cdist` in its clustering has no bfloat16 CPU kernel); `--dtype bfloat16`
is there for when it can.

Memory is measured exactly, without sampling: glibc is told to serve every allocation of 64 KiB or
more with its own mmap (so freed tensors go back to the OS and RSS follows live tensors), the kernel's
RSS high-water mark is reset (`/proc/self/clear_refs`) before a call, and "working memory" is the
high-water mark during the call (`VmHWM`) minus the RSS just before it: activations, KV cache and
temporaries of that call. Weights are resident before the call and excluded; they are reported
separately (bytes of each model's parameters, shared ones counted for each), and "peak" is weights
plus working memory: what the process would need with that model alone loaded (interpreter and
library overhead left out).

Usage:
    python benchmarks/benchmark_setokim_vs_llava.py            # full run (float32), writes benchmarks/results/
    python benchmarks/benchmark_setokim_vs_llava.py --quick    # tiny sizes, smoke run in seconds
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from machine import machine_info  # noqa: E402
from torch import nn  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig  # noqa: E402
from transformers.generation.streamers import BaseStreamer  # noqa: E402

from transformers_setok import SetokConfig, SetokimConfig, SetokimForConditionalGeneration  # noqa: E402

logger = logging.getLogger("benchmark_setokim_vs_llava")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULT_NAME = "setokim_vs_llava"
PREFILL_RATIO_TARGET = 0.35
IMAGE_TOKEN_ID, IMAGE_START_ID, IMAGE_END_ID = 32000, 32001, 32002
BOS_ID, EOS_ID, PAD_ID = 1, 2, 0
MMAP_THRESHOLD_BYTES = 64 * 1024
GIB = 1024**3
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class Sizes:
    """Model and prompt sizes of one benchmark setting."""

    vision: dict[str, int]
    text: dict[str, int]
    merger: dict[str, int]
    setok_tokens: int
    question_tokens: int
    new_tokens: int
    image_counts: tuple[int, ...]


FULL = Sizes(
    vision={
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "image_size": 384,
        "patch_size": 14,
    },
    text={
        "hidden_size": 2048,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 8192,
        "vocab_size": 32003,
        "max_position_embeddings": 4096,
    },
    merger={
        "hidden_size": 1152,
        "token_size": 4096,
        "num_attention_heads": 2,
        "inner_layers": 2,
        "inter_layers": 2,
        "intermediate_size": 4096,
    },
    setok_tokens=64,
    question_tokens=32,
    new_tokens=16,
    image_counts=(1, 4),
)
QUICK = Sizes(
    vision={
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 112,
        "patch_size": 14,
    },
    text={
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": 32003,
        "max_position_embeddings": 1024,
    },
    merger={
        "hidden_size": 64,
        "token_size": 128,
        "num_attention_heads": 2,
        "inner_layers": 2,
        "inter_layers": 2,
        "intermediate_size": 128,
    },
    setok_tokens=8,
    question_tokens=32,
    new_tokens=16,
    image_counts=(1, 4),
)


@dataclass
class Timing:
    """Median seconds over `repeats` timed calls, and the CPUs other processes kept busy during each call."""

    median_s: float
    repeats: int
    call_seconds: list[float]
    other_cpus: list[float]


class StepClock(BaseStreamer):
    """A streamer that only notes when `generate` hands it the prompt and then each new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        """Nothing to flush."""

    def decode_tokens_per_s(self) -> float:
        """Tokens 2..N over the time from the first new token to the last, within this one call."""
        return (len(self.times) - 2) / (self.times[-1] - self.times[1])


def free_freed_memory_to_os() -> None:
    """Make glibc serve allocations of 64 KiB and more with mmap, so freeing a tensor lowers RSS.

    Setting the threshold explicitly also stops glibc from raising it after large frees, which would
    otherwise keep freed tensors in the heap and make RSS deltas meaningless.
    """
    libc = ctypes.CDLL("libc.so.6")
    m_mmap_threshold = -3
    if libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD_BYTES) != 1:
        raise RuntimeError("mallopt(M_MMAP_THRESHOLD) failed; the memory numbers would not be trustworthy")


def read_status_kib(field: str) -> int:
    """One `kB` field of /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure_working_memory(fn: Callable[[], Any]) -> tuple[int, Any]:
    """Peak RSS during `fn()` above the RSS just before it, in bytes (kernel high-water mark, reset first)."""
    Path("/proc/self/clear_refs").write_text("5")
    before = read_status_kib("VmRSS")
    result = fn()
    return (read_status_kib("VmHWM") - before) * 1024, result


def cpu_ticks() -> tuple[int, int]:
    """Clock ticks the whole machine has spent busy, and those this process has used (all its threads)."""
    machine = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle_and_iowait = machine[3] + machine[4]
    own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return sum(machine) - idle_and_iowait, int(own[11]) + int(own[12])


def other_cpus_now(seconds: float = 2.0) -> float:
    """CPUs other processes keep busy, averaged over `seconds` of this process sleeping."""
    busy_before, own_before = cpu_ticks()
    time.sleep(seconds)
    busy_after, own_after = cpu_ticks()
    return max(busy_after - busy_before - (own_after - own_before), 0) / os.sysconf("SC_CLK_TCK") / seconds


def timed_call(fn: Callable[[], Any], with_memory: bool) -> tuple[float, float, int, Any]:
    """Run `fn()` once: wall seconds, CPUs other processes used meanwhile, working memory (0 unless asked), result."""
    busy_before, own_before = cpu_ticks()
    start = time.perf_counter()
    memory, result = measure_working_memory(fn) if with_memory else (0, fn())
    seconds = time.perf_counter() - start
    busy_after, own_after = cpu_ticks()
    other = (busy_after - busy_before - (own_after - own_before)) / os.sysconf("SC_CLK_TCK") / seconds
    return seconds, max(other, 0.0), memory, result


def build_models(
    sizes: Sizes, dtype: torch.dtype
) -> tuple[LlavaForConditionalGeneration, SetokimForConditionalGeneration]:
    """LLaVA and Setokim from one vision config and one LLM config, sharing vision tower, LLM and LM head."""
    vision_config = SiglipVisionConfig(**sizes.vision)
    text_config = LlamaConfig(**sizes.text, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    llava = LlavaForConditionalGeneration(
        LlavaConfig(
            vision_config=vision_config,
            text_config=text_config,
            image_token_id=IMAGE_TOKEN_ID,
            image_seq_length=(sizes.vision["image_size"] // sizes.vision["patch_size"]) ** 2,
            vision_feature_select_strategy="full",
            vision_feature_layer=-2,
            projector_hidden_act="gelu",
        )
    )
    setok_config = SetokConfig(
        vision_config=vision_config,
        vision_feature_layer=-2,
        vision_feature_select_strategy="full",
        min_tokens=sizes.setok_tokens,
        max_tokens=sizes.setok_tokens,
        **sizes.merger,
    )
    with torch.device("meta"):  # the shared parts come from LLaVA: skip allocating and initialising them twice
        setokim = SetokimForConditionalGeneration(
            SetokimConfig(
                setok_config=setok_config,
                text_config=text_config,
                projector_type="mlp2x_gelu",
                image_token_id=IMAGE_TOKEN_ID,
                image_start_token_id=IMAGE_START_ID,
                image_end_token_id=IMAGE_END_ID,
            )
        )
    setokim.model.setok.vision_model = llava.model.vision_tower
    setokim.model.language_model = llava.model.language_model
    setokim.lm_head = llava.lm_head
    setok = setokim.model.setok
    for own in (setok.input_projection, setok.merger, setokim.model.multi_modal_projector):
        own.to_empty(device="cpu")
        own.apply(setok._init_weights)
    on_meta = [name for name, tensor in setokim.state_dict().items() if tensor.is_meta]
    if on_meta:
        raise RuntimeError(f"Setokim tensors left uninitialised: {on_meta}")
    return llava.to(dtype).eval(), setokim.to(dtype).eval()


def parameter_count(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def parameter_bytes(module: nn.Module) -> int:
    return sum(parameter.numel() * parameter.element_size() for parameter in module.parameters())


def build_prompts(
    sizes: Sizes, num_images: int, generator: torch.Generator
) -> tuple[torch.LongTensor, torch.LongTensor, torch.Tensor]:
    """LLaVA `input_ids` (patch tokens written out), Setokim `input_ids` (one wrapped placeholder per image), pixels.

    Both prompts are BOS, the images, then the same random question.
    """
    patches = (sizes.vision["image_size"] // sizes.vision["patch_size"]) ** 2
    question = torch.randint(3, IMAGE_TOKEN_ID, (sizes.question_tokens,), generator=generator).tolist()
    llava_ids = [BOS_ID] + [IMAGE_TOKEN_ID] * patches * num_images + question
    setokim_ids = [BOS_ID] + [IMAGE_START_ID, IMAGE_TOKEN_ID, IMAGE_END_ID] * num_images + question
    side = sizes.vision["image_size"]
    pixel_values = torch.randn(num_images, 3, side, side, generator=generator).clamp(-1, 1)
    return torch.tensor([llava_ids]), torch.tensor([setokim_ids]), pixel_values


class Subject:
    """One model with its prompt: the three calls that are timed, and what they measured."""

    def __init__(self, name: str, model: nn.Module, input_ids: torch.LongTensor, pixel_values: torch.Tensor) -> None:
        self.name, self.model = name, model
        self.inputs = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "pixel_values": pixel_values,
        }
        self.clocks: list[StepClock] = []
        self.calls: dict[str, list[float]] = {}
        self.other_cpus: dict[str, list[float]] = {}
        self.memory: dict[str, int] = {}
        self.results: dict[str, Any] = {}

    def prefill(self) -> Any:
        return self.model(**self.inputs, use_cache=True, logits_to_keep=1)

    def first_token(self) -> torch.LongTensor:
        return self.model.generate(**self.inputs, do_sample=False, pad_token_id=PAD_ID, max_new_tokens=1)

    def generate(self, new_tokens: int) -> torch.LongTensor:
        self.clocks.append(StepClock())
        return self.model.generate(
            **self.inputs,
            do_sample=False,
            pad_token_id=PAD_ID,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            streamer=self.clocks[-1],
        )

    def record(self, measurement: str, fn: Callable[[], Any]) -> float:
        """Time one call of `fn` (the first of each measurement also measures working memory); return seconds."""
        first = measurement not in self.calls
        seconds, other, memory, result = timed_call(fn, with_memory=first)
        self.calls.setdefault(measurement, []).append(seconds)
        self.other_cpus.setdefault(measurement, []).append(other)
        if first:
            self.memory[measurement], self.results[measurement] = memory, result
        return seconds

    def timing(self, measurement: str) -> Timing:
        calls = self.calls[measurement]
        return Timing(statistics.median(calls), len(calls), calls, self.other_cpus[measurement])


def measure_prompt(subjects: list[Subject], new_tokens: int, repeats: int, budget_s: float, label: str) -> None:
    """Prefill, time to first token and generate(N) of every subject, their calls interleaved.

    Each measurement runs in rounds of one call per subject, the order alternating (ABBA) so slow drifts in
    machine load hit both alike; a new round starts only while `repeats` is not reached and it is expected
    to end within `budget_s` of the measurement's start.
    """
    measurements = {
        "prefill": lambda subject: subject.prefill,
        "time_to_first_token": lambda subject: subject.first_token,
        f"generate_{new_tokens}": lambda subject: lambda: subject.generate(new_tokens),
    }
    for measurement, call_of in measurements.items():
        elapsed, rounds = 0.0, 0
        with tqdm(total=repeats, desc=f"{label}, {measurement}", leave=False) as progress:
            while rounds < repeats:
                order = subjects if rounds % 2 == 0 else subjects[::-1]
                round_s = sum(subject.record(measurement, call_of(subject)) for subject in order)
                elapsed, rounds = elapsed + round_s, rounds + 1
                progress.update()
                if elapsed + round_s > budget_s:
                    break
        logger.info(
            "%s, %s: %s over %d round(s)",
            label,
            measurement,
            ", ".join(f"{s.name} {s.timing(measurement).median_s:.3f} s" for s in subjects),
            rounds,
        )


def summarize(subject: Subject, new_tokens: int) -> dict[str, Any]:
    """What one model measured on one prompt."""
    prefill, first = subject.timing("prefill"), subject.timing("time_to_first_token")
    full = subject.timing(f"generate_{new_tokens}")
    input_ids = subject.inputs["input_ids"]
    generated = subject.results[f"generate_{new_tokens}"].shape[1] - input_ids.shape[1]
    if generated != new_tokens:
        raise RuntimeError(f"{subject.name}: generate returned {generated} new tokens, expected {new_tokens}")
    output = subject.results["prefill"]
    vision_tokens = (
        int(output.image_outputs.num_tokens.sum())
        if isinstance(subject.model, SetokimForConditionalGeneration)
        else int((input_ids == IMAGE_TOKEN_ID).sum())
    )
    working = max(subject.memory["prefill"], subject.memory[f"generate_{new_tokens}"])
    weights = parameter_bytes(subject.model)
    other_cpus = [value for values in subject.other_cpus.values() for value in values]
    return {
        "prompt_ids": input_ids.shape[1],
        "vision_tokens": vision_tokens,
        "llm_sequence_tokens": output.past_key_values.get_seq_length(),
        "prefill": asdict(prefill),
        "time_to_first_token": asdict(first),
        f"generate_{new_tokens}": asdict(full),
        "decode_tokens_per_s": (new_tokens - 1) / (full.median_s - first.median_s),
        "decode_tokens_per_s_in_call": statistics.median(clock.decode_tokens_per_s() for clock in subject.clocks),
        "other_cpus_mean": statistics.fmean(other_cpus),
        "working_memory_prefill_bytes": subject.memory["prefill"],
        "working_memory_generate_bytes": subject.memory[f"generate_{new_tokens}"],
        "working_memory_bytes": working,
        "weights_bytes": weights,
        "peak_memory_bytes": weights + working,
    }


RATIO_KEYS = {
    "vision_tokens": lambda m: m["vision_tokens"],
    "prefill_s": lambda m: m["prefill"]["median_s"],
    "time_to_first_token_s": lambda m: m["time_to_first_token"]["median_s"],
    "decode_tokens_per_s": lambda m: m["decode_tokens_per_s"],
    "decode_tokens_per_s_in_call": lambda m: m["decode_tokens_per_s_in_call"],
    "working_memory_bytes": lambda m: m["working_memory_bytes"],
    "peak_memory_bytes": lambda m: m["peak_memory_bytes"],
}


def run_machine_info() -> dict[str, Any]:
    """`machine.machine_info()` plus how many CPUs other processes kept busy at the start."""
    return {**machine_info(), "other_cpus_at_start": other_cpus_now()}


def run(sizes: Sizes, dtype_name: str, repeats: int, budget_s: float, seed: int) -> dict[str, Any]:
    """Measure both models on every prompt; return the results as a dict."""
    machine = run_machine_info()
    if machine["other_cpus_at_start"] > 0.25:
        logger.warning(
            "other processes keep %.2f of %d CPUs busy: timings will be slower and noisier than on an idle machine",
            machine["other_cpus_at_start"],
            machine["logical_cpus"],
        )
    torch.manual_seed(seed)
    start = time.perf_counter()
    logger.info("building LLaVA and Setokim (random weights, %s)", dtype_name)
    llava, setokim = build_models(sizes, DTYPES[dtype_name])
    logger.info("built in %.1f s", time.perf_counter() - start)
    language_model = llava.model.language_model
    counts = {
        "llm_with_lm_head": parameter_count(language_model) + parameter_count(llava.lm_head),
        "vision_encoder": parameter_count(llava.model.vision_tower),
        "llava_projector": parameter_count(llava.model.multi_modal_projector),
        "setok_merger": parameter_count(setokim.model.setok.merger)
        + parameter_count(setokim.model.setok.input_projection),
        "setokim_projector": parameter_count(setokim.model.multi_modal_projector),
        "llava_total": parameter_count(llava),
        "setokim_total": parameter_count(setokim),
    }
    for name, count in counts.items():
        logger.info("parameters, %s: %s (%.3fB)", name, f"{count:,}", count / 1e9)
    generator = torch.Generator().manual_seed(seed)
    dtype = DTYPES[dtype_name]
    prompts = []
    with torch.inference_mode():
        for num_images in sizes.image_counts:
            llava_ids, setokim_ids, pixel_values = build_prompts(sizes, num_images, generator)
            pixel_values = pixel_values.to(dtype)
            subjects = [
                Subject("LLaVA", llava, llava_ids, pixel_values),
                Subject("Setokim", setokim, setokim_ids, pixel_values),
            ]
            if not prompts:
                for subject in subjects:
                    start = time.perf_counter()
                    subject.prefill()
                    logger.info("%s warm-up prefill: %.2f s", subject.name, time.perf_counter() - start)
            label = f"{num_images} image{'s' if num_images > 1 else ''}"
            measure_prompt(subjects, sizes.new_tokens, repeats, budget_s, label)
            llava_result, setokim_result = (summarize(subject, sizes.new_tokens) for subject in subjects)
            ratios = {key: value(setokim_result) / value(llava_result) for key, value in RATIO_KEYS.items()}
            prompts.append(
                {
                    "num_images": num_images,
                    "llava": llava_result,
                    "setokim": setokim_result,
                    "ratio_setokim_over_llava": ratios,
                    "meets_prefill_target": ratios["prefill_s"] <= PREFILL_RATIO_TARGET,
                }
            )
    return {
        "machine": machine,
        "settings": {
            "sizes": asdict(sizes),
            "dtype": dtype_name,
            "repeats": repeats,
            "budget_seconds_per_measurement": budget_s,
            "seed": seed,
            "shared_modules": "vision tower, language model and LM head are the same modules in both models",
            "inputs": "random weights, random pixels (seeded torch.randn clamped to [-1, 1]) and question ids; "
            "torch.inference_mode, eval(), greedy decoding",
            "memory": "working = kernel RSS high-water mark (VmHWM, reset before the call) minus RSS just before "
            f"it, glibc mmap threshold fixed at {MMAP_THRESHOLD_BYTES // 1024} KiB so freed tensors leave RSS; the "
            f"larger of the first timed prefill and the first timed generate({sizes.new_tokens}); weights = "
            "parameter bytes of the model (shared parts counted for each); peak = weights + working",
            "wall_seconds": None,
        },
        "parameters": counts,
        "prefill_ratio_target": PREFILL_RATIO_TARGET,
        "prompts": prompts,
    }


def format_seconds(seconds: float) -> str:
    """`1.23 s` from one second up, `456 ms` below."""
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1e3:.3g} ms"


def markdown_report(results: dict[str, Any]) -> str:
    """The results as a markdown report: settings, one table, machine."""
    settings, machine, counts = results["settings"], results["machine"], results["parameters"]
    sizes = settings["sizes"]
    new_tokens = sizes["new_tokens"]
    patches = (sizes["vision"]["image_size"] // sizes["vision"]["patch_size"]) ** 2
    lines = [
        "# Setokim vs LLaVA: same vision encoder, same LLM",
        "",
        f"SigLIP vision encoder ({counts['vision_encoder'] / 1e6:.0f}M parameters, {patches} patches per image) and a "
        f"Llama LLM ({counts['llm_with_lm_head'] / 1e9:.3f}B parameters with its LM head: hidden "
        f"{sizes['text']['hidden_size']}, {sizes['text']['num_hidden_layers']} layers, "
        f"{sizes['text']['num_attention_heads']} heads / {sizes['text']['num_key_value_heads']} KV heads, MLP "
        f"{sizes['text']['intermediate_size']}, vocab {sizes['text']['vocab_size']}), shared by both models. LLaVA: "
        f"{patches} patch tokens per image through a {counts['llava_projector'] / 1e6:.1f}M projector. Setokim: "
        f"{sizes['setok_tokens']} tokens per image (min = max), merger {counts['setok_merger'] / 1e6:.1f}M + "
        f"projector {counts['setokim_projector'] / 1e6:.1f}M. Prompt: BOS, the images, a "
        f"{sizes['question_tokens']}-token question. {settings['dtype']}, {settings['inputs']}.",
        "",
        "Prefill = one forward over the prompt including vision encoding (`use_cache=True`, `logits_to_keep=1`); "
        f"TTFT = `generate(max_new_tokens=1)`; decode = `({new_tokens} - 1) / (t({new_tokens}) - t(1))` with greedy "
        f"`generate(min_new_tokens={new_tokens})`; decode in-call = the same rate timed inside each "
        f"`generate({new_tokens})` call from token 1 to token {new_tokens} (a streamer notes the arrival times). "
        "One warm-up prefill per model; then each measurement in rounds of one call per model, order alternating; "
        "medians over the rounds (their number in brackets). Other CPUs = CPUs other processes kept busy during "
        f"this model's timed calls on this prompt (mean, of {results['machine']['logical_cpus']}). "
        f"Memory: {settings['memory']}.",
        "",
        "| images | model | vision tokens | LLM sequence | prefill | TTFT | decode tok/s | decode tok/s in-call "
        "| working mem | weights | peak mem | other CPUs |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for prompt in results["prompts"]:
        for name, key in (("LLaVA", "llava"), ("Setokim", "setokim")):
            m = prompt[key]
            lines.append(
                f"| {prompt['num_images']} | {name} | {m['vision_tokens']} | {m['llm_sequence_tokens']} "
                f"| {format_seconds(m['prefill']['median_s'])} ({m['prefill']['repeats']}) "
                f"| {format_seconds(m['time_to_first_token']['median_s'])} ({m['time_to_first_token']['repeats']}) "
                f"| {m['decode_tokens_per_s']:.2f} ({m[f'generate_{new_tokens}']['repeats']}) "
                f"| {m['decode_tokens_per_s_in_call']:.2f} "
                f"| {m['working_memory_bytes'] / GIB:.2f} GiB | {m['weights_bytes'] / GIB:.2f} GiB "
                f"| {m['peak_memory_bytes'] / GIB:.2f} GiB | {m['other_cpus_mean']:.2f} |"
            )
        r = prompt["ratio_setokim_over_llava"]
        verdict = "meets" if prompt["meets_prefill_target"] else "misses"
        lines.append(
            f"| {prompt['num_images']} | **Setokim / LLaVA** | {r['vision_tokens']:.3f} | "
            f"{prompt['setokim']['llm_sequence_tokens'] / prompt['llava']['llm_sequence_tokens']:.3f} "
            f"| **{r['prefill_s']:.3f}** ({verdict} <= {results['prefill_ratio_target']}) "
            f"| {r['time_to_first_token_s']:.3f} | {r['decode_tokens_per_s']:.3f} "
            f"| {r['decode_tokens_per_s_in_call']:.3f} | {r['working_memory_bytes']:.3f} "
            f"| {prompt['setokim']['weights_bytes'] / prompt['llava']['weights_bytes']:.3f} "
            f"| {r['peak_memory_bytes']:.3f} | |"
        )
    lines += [
        "",
        f"Machine: {machine['cpu_model']} ({', '.join(machine['cpu_bf16_flags']) or 'no bf16 flags'}), "
        f"{machine['logical_cpus']} logical CPUs, {machine['total_memory_gib']} GiB RAM; torch {machine['torch']} "
        f"({machine['torch_threads']} threads), transformers {machine['transformers']}, Python {machine['python']}. "
        f"Whole run: {settings['wall_seconds']:.0f} s. Other processes kept {machine['other_cpus_at_start']:.2f} CPUs "
        "busy just before the run. Load average (1, 5, 15 min) at start "
        f"{', '.join(f'{v:.2f}' for v in machine['load_average_at_start'])}, at end "
        f"{', '.join(f'{v:.2f}' for v in machine['load_average_at_end'])} (other processes share the CPUs).",
        "",
    ]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """Six panels (prefill, TTFT, working memory, two decode rates, peak memory): LLaVA vs Setokim per prompt."""
    prompts, sizes = results["prompts"], results["settings"]["sizes"]
    new_tokens = sizes["new_tokens"]
    panels = (
        (
            f"prefill (s, lower is better; target <= {results['prefill_ratio_target']}x)",
            lambda m: m["prefill"]["median_s"],
            "prefill_s",
            format_seconds,
        ),
        (
            "time to first token (s, lower is better)",
            lambda m: m["time_to_first_token"]["median_s"],
            "time_to_first_token_s",
            format_seconds,
        ),
        (
            "working memory of a call (GiB)",
            lambda m: m["working_memory_bytes"] / GIB,
            "working_memory_bytes",
            "{:.2f}".format,
        ),
        (
            f"decode tok/s: {new_tokens - 1} / (t({new_tokens}) - t(1))",
            lambda m: m["decode_tokens_per_s"],
            "decode_tokens_per_s",
            "{:.2f}".format,
        ),
        (
            "decode tok/s timed inside generate",
            lambda m: m["decode_tokens_per_s_in_call"],
            "decode_tokens_per_s_in_call",
            "{:.2f}".format,
        ),
        (
            "peak memory: weights + working (GiB)",
            lambda m: m["peak_memory_bytes"] / GIB,
            "peak_memory_bytes",
            "{:.2f}".format,
        ),
    )
    patches = (sizes["vision"]["image_size"] // sizes["vision"]["patch_size"]) ** 2
    labels = [f"{p['num_images']} image{'s' if p['num_images'] > 1 else ''}" for p in prompts]
    positions = range(len(prompts))
    width = 0.38
    figure, axes = plt.subplots(2, 3, figsize=(15, 9))
    for axis, (title, value, ratio_key, fmt) in zip(axes.flat, panels):
        bars = []
        for offset, key, label, color in (
            (-width / 2, "llava", f"LLaVA ({patches} tokens / image)", "#d9822b"),
            (width / 2, "setokim", f"Setokim ({sizes['setok_tokens']} tokens / image)", "#2a7ab9"),
        ):
            values = [value(p[key]) for p in prompts]
            bars.append(values)
            container = axis.bar([x + offset for x in positions], values, width, label=label, color=color)
            axis.bar_label(container, [fmt(v) for v in values], padding=2, fontsize=10)
        top = max(max(values) for values in bars) * 1.3
        for x, prompt in zip(positions, prompts):
            ratio = prompt["ratio_setokim_over_llava"][ratio_key]
            axis.text(x, top * 0.9, f"{ratio:.2f}x", ha="center", fontsize=12, weight="bold")
        axis.set_ylim(0, top)
        axis.set_xticks(list(positions), labels, fontsize=11)
        axis.set_title(title, fontsize=12)
    handles, names = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, names, loc="lower center", ncol=2, fontsize=12, frameon=False)
    machine, settings, counts = results["machine"], results["settings"], results["parameters"]
    figure.suptitle(
        f"Setokim vs LLaVA: shared SigLIP encoder ({counts['vision_encoder'] / 1e6:.3g}M) + Llama "
        f"({counts['llm_with_lm_head'] / 1e6:,.4g}M), {settings['dtype']}, random weights (bold: Setokim / LLaVA)\n"
        f"{machine['cpu_model']}, {machine['torch_threads']} threads, torch {machine['torch']}",
        fontsize=13,
    )
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    figure.savefig(path, dpi=100)
    plt.close(figure)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="float32",
        help="dtype of both models (bfloat16 currently fails in Setokim's clustering: cdist has no bf16 CPU kernel)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="most rounds of timed calls per measurement")
    parser.add_argument(
        "--budget",
        type=float,
        default=75.0,
        help="seconds per measurement: no new round of calls that would end later than this (>= 1 round)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run in seconds")
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help=f"where results go (default {RESULTS_DIR}; a temporary directory with --quick)",
    )
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    args = parse_args()
    free_freed_memory_to_os()
    start = time.perf_counter()
    results = run(QUICK if args.quick else FULL, args.dtype, args.repeats, args.budget, args.seed)
    results["settings"]["wall_seconds"] = time.perf_counter() - start
    results["machine"]["load_average_at_end"] = os.getloadavg()
    output_dir = args.output_dir or (Path(tempfile.mkdtemp(prefix="setokim_vs_llava_")) if args.quick else RESULTS_DIR)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"{RESULT_NAME}.json").write_text(json.dumps(results, indent=2) + "\n")
    report = markdown_report(results)
    (output_dir / f"{RESULT_NAME}.md").write_text(report)
    plot(results, output_dir / f"{RESULT_NAME}.png")
    print(report)
    logger.info("results written to %s", output_dir)


if __name__ == "__main__":
    main()
