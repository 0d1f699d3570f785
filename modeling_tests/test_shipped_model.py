"""The tiny Setokim the project trains and ships: it loads offline through the Auto classes and through
`trust_remote_code` without the plugin, fits its size budget, and keeps its answers, masks and token counts on
fixed inputs (scenes of world seed 3, which no training step saw). A change that alters them shows up here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_without_plugin
from transformers import AutoModelForImageTextToText, AutoProcessor

import transformers_setok
from transformers_setok import SetokimForConditionalGeneration, SetokimProcessor, shapes_world
from transformers_setok.cli.demo import SHIPPED_MODEL
from transformers_setok.recipes.evaluation import answer_questions, count_tokens, segment_expressions
from transformers_setok.recipes.training_card import TARGETS
from transformers_setok.recipes.world_data import chat_inputs

# What the shipped model does on world seed 3: its greedy answers to the first 8 questions (the truth beside
# them: it gets 5 right), the IoU of its masks for the first 4 referring expressions, and the token count of
# each of the 4 scenes (with 4, 2, 4 and 1 objects).
ANSWERS = ["blue", "no", "triangle", "5", "no", "no", "purple", "no"]
TRUTH = ["blue", "no", "bar", "4", "yes", "no", "purple", "no"]
IOUS = [0.4205, 0.0, 0.3556, 0.2525]
TOKENS = [12, 4, 12, 4]
OBJECTS = [4, 2, 4, 1]


@pytest.fixture(scope="module")
def shipped() -> tuple[SetokimForConditionalGeneration, SetokimProcessor]:
    model = AutoModelForImageTextToText.from_pretrained(SHIPPED_MODEL).eval()
    return model, AutoProcessor.from_pretrained(SHIPPED_MODEL)


@pytest.fixture(scope="module")
def world() -> dict[str, list[dict]]:
    return {task: list(dataset) for task, dataset in shapes_world(3, 4, 64).items()}


def test_it_fits_in_25_mb_and_its_card_reports_the_held_out_metrics() -> None:
    assert (SHIPPED_MODEL / "model.safetensors").stat().st_size <= 25 * 2**20
    evaluation = json.loads((SHIPPED_MODEL / "eval_results.json").read_text())
    card = (SHIPPED_MODEL / "README.md").read_text()
    assert evaluation["seed"] == 1 and "setok train --all --out runs/tiny" in card
    for task, metric, _ in TARGETS:
        assert f"value: {evaluation['metrics'][task][metric]}" in card  # in the Hub's model-index metadata


def test_its_remote_code_is_the_packages_code() -> None:
    """The modules `trust_remote_code` loads are the package's own, so users without the plugin get its fixes."""
    package = Path(transformers_setok.__file__).parent
    stale = [
        path.name for path in SHIPPED_MODEL.glob("*.py") if path.read_bytes() != (package / path.name).read_bytes()
    ]
    assert stale == [], f"copy these from {package} into {SHIPPED_MODEL}"


def test_it_loads_through_the_auto_classes(shipped) -> None:
    model, processor = shipped
    assert isinstance(model, SetokimForConditionalGeneration) and isinstance(processor, SetokimProcessor)
    assert model.detokenizer is not None and model.mask_decoder is not None and model.vision_head is not None


def test_its_answers_are_pinned(shipped, world) -> None:
    result = answer_questions(*shipped, world["questions"][:8], batch_size=8)
    assert [example["answer"] for example in result.examples] == TRUTH
    assert [example["prediction"] for example in result.examples] == ANSWERS
    assert result.metrics["accuracy"] == pytest.approx(5 / 8)


def test_its_masks_are_pinned(shipped, world) -> None:
    result = segment_expressions(*shipped, world["referring"][:4], batch_size=4)
    ious = [
        np.logical_and(e["mask"], e["prediction"]).sum() / max(np.logical_or(e["mask"], e["prediction"]).sum(), 1)
        for e in result.examples
    ]
    assert ious == pytest.approx(IOUS, abs=1e-3)


def test_its_token_counts_are_pinned_and_grow_with_the_objects(shipped, world) -> None:
    result = count_tokens(*shipped, world["captions"], batch_size=4)
    assert [example["num_objects"] for example in result.examples] == OBJECTS
    assert [example["num_tokens"] for example in result.examples] == TOKENS


REMOTE_SCRIPT = """
import sys
import torch
from transformers import AutoModelForImageTextToText

model = AutoModelForImageTextToText.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
assert "transformers_setok" not in sys.modules
inputs = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    torch.save(model(**inputs).logits, sys.argv[3])
print(type(model).__name__)
"""


def test_it_loads_with_trust_remote_code_without_the_plugin(shipped, world, tmp_path: Path) -> None:
    model, processor = shipped
    inputs = dict(chat_inputs(processor, [world["questions"][0]["question"]], [world["questions"][0]["image"]]))
    torch.save(inputs, tmp_path / "inputs.pt")
    stdout = run_without_plugin(
        REMOTE_SCRIPT, str(SHIPPED_MODEL), str(tmp_path / "inputs.pt"), str(tmp_path / "logits.pt"), workdir=tmp_path
    )
    assert stdout.strip().splitlines()[-1] == "SetokimForConditionalGeneration"
    with torch.no_grad():
        expected = model(**inputs).logits
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt", weights_only=True), expected, atol=1e-5, rtol=0)
