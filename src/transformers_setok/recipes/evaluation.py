"""Evaluation of a Setokim on a held-out seed of the shapes world: every task, measured by the project's metrics.

Each task function runs the model on records of one task, batched, and returns a `TaskResult`: its metrics and,
per example, what went in and what came out (the demo report shows those). `evaluate_world` runs them all.
Drawing and editing are judged by the rule-based scene reader (`scene_checks`); reconstruction by PSNR at the
detokenizer's size; segmentation by gIoU / cIoU; answers by exact match; SeTok's dynamic token count by the
Spearman correlation between a scene's object count and its token count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..metrics import load_metric
from ..modeling_setokim import SetokimForConditionalGeneration
from ..pipeline_setok_detokenizer import SetokDetokenizerPipeline
from ..processing_setokim import SetokimProcessor
from ..shapes_world import shapes_world
from .world_data import chat_inputs, draw_request, edit_request, segment_request

EVALUATED_TASKS = ("questions", "referring", "reconstruction", "text_to_image", "editing", "token_counts")


@dataclass
class TaskResult:
    """A task's metrics and its examples (inputs and outputs, for reports)."""

    metrics: dict[str, float]
    examples: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class RenderSettings:
    """How written or encoded tokens are drawn: sampler steps, guidance, and the seed of the starting noise."""

    num_inference_steps: int = 10
    guidance_scale: float = 3.0
    seed: int = 0

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)


def batches(records: Sequence[Any], batch_size: int, description: str) -> Iterator[Sequence[Any]]:
    starts = range(0, len(records), batch_size)
    for start in tqdm(starts, desc=description, leave=False):
        yield records[start : start + batch_size]


def answer_questions(
    model: SetokimForConditionalGeneration, processor: SetokimProcessor, records: Sequence[Mapping], batch_size: int
) -> TaskResult:
    """Greedy answers to the questions, matched against the reference answers (after the `answer_accuracy`
    metric's normalisation), overall and per kind; each example says whether its answer was right."""
    from ..metrics.answer_accuracy.answer_accuracy import normalize_answer  # imports `evaluate`: only when used

    examples = []
    for batch in batches(records, batch_size, "questions"):
        inputs = chat_inputs(processor, [r["question"] for r in batch], [r["image"] for r in batch])
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        answers = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        for record, answer in zip(batch, answers):
            examples.append(
                {
                    **{k: record[k] for k in ("image", "question", "answer", "kind")},
                    "prediction": answer.strip(),
                    "correct": normalize_answer(answer) == normalize_answer(record["answer"]),
                }
            )
    accuracy = load_metric("answer_accuracy")
    metrics = accuracy.compute(
        predictions=[e["prediction"] for e in examples], references=[e["answer"] for e in examples]
    )
    for kind in sorted({e["kind"] for e in examples}):
        of_kind = [e for e in examples if e["kind"] == kind]
        metrics[f"accuracy_{kind}"] = float(np.mean([e["correct"] for e in of_kind]))
    return TaskResult(metrics, examples)


def segment_expressions(
    model: SetokimForConditionalGeneration, processor: SetokimProcessor, records: Sequence[Mapping], batch_size: int
) -> TaskResult:
    """Masks of the referred objects (`segment`), against the true masks: gIoU and cIoU, and each mask's IoU."""
    from ..metrics.referring_iou.referring_iou import iou, overlap  # imports `evaluate`: only when used

    examples = []
    for batch in batches(records, batch_size, "referring"):
        images = [r["image"] for r in batch]
        inputs = chat_inputs(processor, [segment_request(r["expression"]) for r in batch], images)
        out = model.segment(
            inputs["input_ids"], inputs["pixel_values"], attention_mask=inputs["attention_mask"], max_new_tokens=3
        )
        masks = processor.post_process_masks(out, [image.size[::-1] for image in images])
        for record, mask in zip(batch, masks):
            truth, prediction = np.asarray(record["mask"], dtype=bool), mask.cpu().numpy()
            examples.append(
                {
                    **{k: record[k] for k in ("image", "expression")},
                    "mask": truth,
                    "prediction": prediction,
                    "iou": iou(*overlap(prediction, truth)),
                }
            )
    metric = load_metric("referring_iou")
    metrics = metric.compute(predictions=[e["prediction"] for e in examples], references=[e["mask"] for e in examples])
    return TaskResult(metrics, examples)


def reconstruct_images(
    model: SetokimForConditionalGeneration,
    processor: SetokimProcessor,
    images: Sequence[Image.Image],
    batch_size: int,
    render: RenderSettings,
) -> TaskResult:
    """Each image redrawn by the detokenizer from its own SeTok tokens, against the image: PSNR."""
    pipeline = SetokDetokenizerPipeline.from_detokenizer(model.detokenizer)
    pipeline.set_progress_bar_config(disable=True)
    size = model.detokenizer.image_size
    examples = []
    generator = render.generator()
    for batch in batches(images, batch_size, "reconstruction"):
        pixel_values = processor.image_processor(images=list(batch), return_tensors="pt").pixel_values
        with torch.no_grad():
            tokenized = model.model.setok(pixel_values.to(model.device, model.dtype))
        drawn = pipeline(
            tokens=tokenized.tokens,
            token_mask=tokenized.token_mask,
            num_inference_steps=render.num_inference_steps,
            guidance_scale=render.guidance_scale,
            generator=generator,
            output_type="pil",
        ).images
        for image, redrawn, count in zip(batch, drawn, tokenized.num_tokens.tolist()):
            examples.append(
                {"image": image.convert("RGB").resize((size, size)), "prediction": redrawn, "num_tokens": count}
            )
    metric = load_metric("reconstruction_psnr")
    metrics = metric.compute(
        predictions=[np.asarray(e["prediction"], dtype=np.float64) / 255 for e in examples],
        references=[np.asarray(e["image"], dtype=np.float64) / 255 for e in examples],
    )
    return TaskResult(metrics, examples)


def generate_images(
    model: SetokimForConditionalGeneration,
    processor: SetokimProcessor,
    requests: Sequence[str],
    images: Sequence[Image.Image] | None,
    batch_size: int,
    render: RenderSettings,
    description: str,
) -> list[Image.Image]:
    generator = render.generator()
    drawn = []
    for start in tqdm(range(0, len(requests), batch_size), desc=description, leave=False):
        batch_images = images[start : start + batch_size] if images is not None else None
        inputs = chat_inputs(processor, requests[start : start + batch_size], batch_images)
        out = model.generate_images(
            inputs["input_ids"],
            inputs.get("pixel_values"),
            attention_mask=inputs["attention_mask"],
            max_new_tokens=3,
            num_inference_steps=render.num_inference_steps,
            guidance_scale=render.guidance_scale,
            generator=generator,
        )
        drawn += out.images
    return drawn


def draw_prompts(
    model: SetokimForConditionalGeneration,
    processor: SetokimProcessor,
    records: Sequence[Mapping],
    batch_size: int,
    render: RenderSettings,
) -> TaskResult:
    """Images drawn from the prompts; the scene reader says whether each shows every object its prompt names."""
    prompts = [r["prompt"] for r in records]
    drawn = generate_images(model, processor, [draw_request(p) for p in prompts], None, batch_size, render, "drawing")
    checks = load_metric("scene_checks", "text_to_image")
    metrics = checks.compute(predictions=drawn, references=prompts)
    examples = [{"prompt": p, "image": r["image"], "prediction": d} for p, r, d in zip(prompts, records, drawn)]
    return TaskResult(metrics, examples)


def apply_edits(
    model: SetokimForConditionalGeneration,
    processor: SetokimProcessor,
    records: Sequence[Mapping],
    batch_size: int,
    render: RenderSettings,
) -> TaskResult:
    """Edited images; the scene reader says whether each changed what was asked and kept the rest."""
    instructions = [r["instruction"] for r in records]
    sources = [r["source_image"] for r in records]
    requests = [edit_request(i) for i in instructions]
    edited = generate_images(model, processor, requests, sources, batch_size, render, "editing")
    checks = load_metric("scene_checks", "editing")
    metrics = checks.compute(predictions=edited, references=instructions, sources=sources)
    for operation in sorted({r["operation"] for r in records}):
        rows = [i for i, r in enumerate(records) if r["operation"] == operation]
        single = checks.compute(
            predictions=[edited[i] for i in rows],
            references=[instructions[i] for i in rows],
            sources=[sources[i] for i in rows],
        )
        metrics[f"accuracy_{operation}"] = single["accuracy"]
    examples = [
        {"instruction": i, "image": s, "target": r["edited_image"], "prediction": e}
        for i, s, r, e in zip(instructions, sources, records, edited)
    ]
    return TaskResult(metrics, examples)


def spearman(first: Sequence[float], second: Sequence[float]) -> float:
    """Spearman's rank correlation: the Pearson correlation of the ranks, ties given their mean rank."""

    def ranks(values: Sequence[float]) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        order = values.argsort(kind="stable")
        ranked = np.empty(len(values))
        ranked[order] = np.arange(len(values))
        for value in np.unique(values):
            ranked[values == value] = ranked[values == value].mean()
        return ranked

    a, b = ranks(first), ranks(second)
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def count_tokens(
    model: SetokimForConditionalGeneration, processor: SetokimProcessor, records: Sequence[Mapping], batch_size: int
) -> TaskResult:
    """SeTok's token count per scene against its object count: their Spearman correlation, and the mean count
    per object count."""
    examples = []
    for batch in batches(records, batch_size, "token counts"):
        pixel_values = processor.image_processor(images=[r["image"] for r in batch], return_tensors="pt").pixel_values
        with torch.no_grad():
            tokenized = model.model.setok(pixel_values.to(model.device, model.dtype))
        for record, count, assignment in zip(batch, tokenized.num_tokens.tolist(), tokenized.assignment):
            examples.append(
                {
                    "image": record["image"],
                    "num_objects": len(record["scene"]["objects"]),
                    "num_tokens": count,
                    "assignment": assignment.view(tokenized.grid_size).cpu().numpy(),
                }
            )
    objects, tokens = [e["num_objects"] for e in examples], [e["num_tokens"] for e in examples]
    metrics = {"spearman": spearman(objects, tokens), "mean_tokens": float(np.mean(tokens))}
    per_count: dict[int, list[int]] = {}
    for n, t in zip(objects, tokens):
        per_count.setdefault(n, []).append(t)
    metrics.update({f"mean_tokens_{n}_objects": float(np.mean(t)) for n, t in sorted(per_count.items())})
    return TaskResult(metrics, examples)


def evaluate_world(
    model: SetokimForConditionalGeneration,
    processor: SetokimProcessor,
    seed: int = 1,
    num_scenes: int = 100,
    tasks: Sequence[str] = EVALUATED_TASKS,
    batch_size: int = 16,
    render: RenderSettings | None = None,
) -> dict[str, TaskResult]:
    """Every task in `tasks` on `num_scenes` scenes of the world `seed` (use one the model never trained on)."""
    unknown = sorted(set(tasks) - set(EVALUATED_TASKS))
    if unknown or not tasks:
        raise ValueError(f"`tasks` must be a non-empty selection of {EVALUATED_TASKS}, got {list(tasks)}")
    render = render or RenderSettings()
    world = {
        name: list(dataset)  # records as dicts, images decoded once
        for name, dataset in shapes_world(seed, num_scenes, image_size=processor.image_processor.size.height).items()
    }
    runs: dict[str, Callable[[], TaskResult]] = {
        "questions": lambda: answer_questions(model, processor, world["questions"], batch_size),
        "referring": lambda: segment_expressions(model, processor, world["referring"], batch_size),
        "reconstruction": lambda: reconstruct_images(
            model, processor, [r["image"] for r in world["captions"]], batch_size, render
        ),
        "text_to_image": lambda: draw_prompts(model, processor, world["text_to_image"], batch_size, render),
        "editing": lambda: apply_edits(model, processor, world["editing"], batch_size, render),
        "token_counts": lambda: count_tokens(model, processor, world["captions"], batch_size),
    }
    model.eval()
    return {task: runs[task]() for task in tasks}


def summary(results: Mapping[str, TaskResult]) -> dict[str, dict[str, float]]:
    """Just the metrics of each task (what `setok evaluate` writes as JSON)."""
    return {
        task: {name: round(float(value), 4) for name, value in result.metrics.items()}
        for task, result in results.items()
    }


__all__ = ["EVALUATED_TASKS", "RenderSettings", "TaskResult", "evaluate_world", "spearman", "summary"]
