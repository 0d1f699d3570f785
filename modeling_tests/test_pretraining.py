"""SetokForPreTraining: losses, gradients, one checkpoint through Auto classes and remote code, a Trainer run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import randomize_weights, run_without_plugin, tiny_setok_config
from huggingface_hub.errors import StrictDataclassError
from pretraining_fixtures import (
    CANVAS_SETTINGS,
    reference_canvas_shares,
    tiny_detokenizer_config,
    tiny_pretraining_config,
    toy_examples,
)
from torch.utils.data import default_collate
from transformers import AutoConfig, AutoModelForPreTraining, Trainer, TrainingArguments

from transformers_setok import (
    SetokDetokenizerPipeline,
    SetokForPreTraining,
    SetokForPreTrainingConfig,
)


@pytest.fixture
def model() -> SetokForPreTraining:
    torch.manual_seed(0)
    return SetokForPreTraining(tiny_pretraining_config()).eval()


def batch(count: int = 4) -> dict[str, torch.Tensor]:
    return default_collate(toy_examples()[:count])


def test_loss_is_the_weighted_sum_and_outputs_carry_the_tokens(model) -> None:
    inputs = batch()
    out = model(**inputs)
    torch.testing.assert_close(out.loss, out.reconstruction_loss + out.contrastive_loss)
    tokens = model.setok(inputs["pixel_values"])
    torch.testing.assert_close(out.tokens, tokens.tokens)
    assert torch.equal(out.num_tokens, tokens.num_tokens) and torch.equal(out.token_mask, tokens.token_mask)

    model.config.contrastive_loss_weight = 0.5
    halved = model(**inputs)
    torch.testing.assert_close(halved.loss, out.reconstruction_loss + 0.5 * out.contrastive_loss)
    without_phrases = model(inputs["pixel_values"], noise=inputs["noise"], timesteps=inputs["timesteps"])
    assert without_phrases.contrastive_loss is None
    torch.testing.assert_close(without_phrases.loss, out.reconstruction_loss)


def test_reconstruction_target_defaults_to_the_resized_pixels(model) -> None:
    inputs = batch()
    resized = torch.nn.functional.interpolate(inputs["pixel_values"], size=(8, 8), mode="bilinear", antialias=True)
    explicit = model(**inputs, labels=resized).reconstruction_loss
    torch.testing.assert_close(model(**inputs).reconstruction_loss, explicit)
    assert (model(**inputs, labels=-resized).reconstruction_loss - explicit).abs() > 1e-4


@pytest.mark.parametrize("freeze_vision_model", [True, False])
def test_gradients_reach_the_merger_and_the_encoder_only_when_unfrozen(freeze_vision_model) -> None:
    torch.manual_seed(0)
    model = SetokForPreTraining(tiny_pretraining_config(freeze_vision_model=freeze_vision_model)).train()
    inputs = batch()
    model(inputs["pixel_values"]).reconstruction_loss.backward()  # the denoising loss alone
    merger_grad = model.setok.merger.inner_encoder.layers[0].attention.qkv.weight.grad
    assert merger_grad is not None and merger_grad.abs().sum() > 0
    encoder_grads = [p.grad for p in model.setok.vision_model.parameters()]
    if freeze_vision_model:
        assert all(grad is None for grad in encoder_grads)
        assert not model.setok.vision_model.training and not model.concept_head.text_model.training
    else:
        assert any(grad is not None and grad.abs().sum() > 0 for grad in encoder_grads)
    assert all(p.grad is None for p in model.concept_head.text_model.parameters())


def test_save_load_round_trip_gives_identical_losses_and_images(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = randomize_weights(SetokForPreTraining(tiny_pretraining_config()), seed=5).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_setok_pretraining.SetokForPreTrainingConfig",
        "AutoModelForPreTraining": "modeling_setok_pretraining.SetokForPreTraining",
    }
    assert type(AutoConfig.from_pretrained(tmp_path)) is SetokForPreTrainingConfig
    reloaded = AutoModelForPreTraining.from_pretrained(tmp_path).eval()
    assert type(reloaded) is SetokForPreTraining

    inputs = batch()
    before, after = model(**inputs), reloaded(**inputs)
    for field in ("loss", "reconstruction_loss", "contrastive_loss", "tokens"):
        assert torch.equal(before[field], after[field]), field

    def render(pretraining: SetokForPreTraining) -> torch.Tensor:
        pipe = SetokDetokenizerPipeline.from_detokenizer(pretraining.detokenizer)
        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(0)
        return pipe(
            before.tokens, before.token_mask, num_inference_steps=3, generator=generator, output_type="pt"
        ).images

    assert torch.equal(render(model), render(reloaded))


REMOTE_CODE_SCRIPT = """
import sys
import torch
from transformers import AutoModelForPreTraining

model = AutoModelForPreTraining.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
assert "transformers_setok" not in sys.modules
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
with torch.no_grad():
    out = model(**torch.load(sys.argv[2], weights_only=True))
torch.save({"loss": out.loss, "tokens": out.tokens}, sys.argv[3])
print(type(model).__name__)
"""


def test_trust_remote_code_loads_without_the_plugin(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = randomize_weights(SetokForPreTraining(tiny_pretraining_config()), seed=6).eval()
    model.save_pretrained(tmp_path / "checkpoint")
    inputs = batch(2)
    torch.save(inputs, tmp_path / "inputs.pt")
    stdout = run_without_plugin(
        REMOTE_CODE_SCRIPT,
        str(tmp_path / "checkpoint"),
        str(tmp_path / "inputs.pt"),
        str(tmp_path / "out.pt"),
        workdir=tmp_path,
    )
    assert "SetokForPreTraining" in stdout
    remote = torch.load(tmp_path / "out.pt", weights_only=True)
    with torch.no_grad():
        local = model(**inputs)
    torch.testing.assert_close(remote["loss"], local.loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(remote["tokens"], local.tokens, atol=1e-6, rtol=0)


def test_a_short_trainer_run_lowers_both_losses(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SetokForPreTraining(tiny_pretraining_config())
    examples = toy_examples()
    fixed = default_collate(examples)  # validation with each image's fixed noise and timestep

    def losses() -> tuple[float, float]:
        model.eval()
        with torch.no_grad():
            out = model(**fixed)
        return out.reconstruction_loss.item(), out.contrastive_loss.item()

    reconstruction_before, contrastive_before = losses()
    train = [
        {key: value for key, value in example.items() if key not in ("noise", "timesteps")} for example in examples
    ]
    args = TrainingArguments(
        tmp_path,
        max_steps=12,
        per_device_train_batch_size=8,
        learning_rate=6e-3,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    Trainer(model=model, args=args, train_dataset=train).train()
    reconstruction_after, contrastive_after = losses()
    assert reconstruction_after < 0.85 * reconstruction_before, (reconstruction_before, reconstruction_after)
    assert contrastive_after < 0.6 * contrastive_before, (contrastive_before, contrastive_after)


def canvas_pretraining_config(**overrides) -> SetokForPreTrainingConfig:
    return tiny_pretraining_config(detokenizer_config=tiny_detokenizer_config(**CANVAS_SETTINGS), **overrides)


def test_layout_loss_is_the_canvas_cross_entropy_against_the_tokens_clusters() -> None:
    torch.manual_seed(0)
    model = randomize_weights(SetokForPreTraining(canvas_pretraining_config(layout_loss_weight=0.5)), seed=2).eval()
    inputs = batch()
    out = model(**inputs)
    torch.testing.assert_close(out.loss, out.reconstruction_loss + out.contrastive_loss + 0.5 * out.layout_loss)

    tokenized = model.setok(inputs["pixel_values"])
    conditioner = model.detokenizer.conditioner
    hidden = conditioner.projection(tokenized.tokens)
    code = conditioner.coordinate_code(torch.zeros(1, 3, 8, 8))  # at the detokenizer's size, from nothing else
    with torch.no_grad():
        shares = reference_canvas_shares(conditioner, hidden, tokenized.token_mask, code)
    rows, cols = tokenized.grid_size
    cell = 8 // rows
    terms = []
    for b, assignment in enumerate(tokenized.assignment.tolist()):
        for patch, token in enumerate(assignment):
            if token >= 0:
                y, x = divmod(patch, cols)
                own = shares[b, token, y * cell : (y + 1) * cell, x * cell : (x + 1) * cell].mean()
                terms.append(-torch.log(own))
    assert len(terms) > 0
    torch.testing.assert_close(out.layout_loss, torch.stack(terms).mean(), atol=1e-5, rtol=1e-5)
    assert model(**{**inputs, "concept_input_ids": None}).layout_loss is not None

    model.config.layout_loss_weight = 0.0
    assert model(**inputs).layout_loss is None


def test_layout_loss_needs_a_canvas() -> None:
    with pytest.raises(StrictDataclassError, match="canvas_channels"):
        tiny_pretraining_config(layout_loss_weight=1.0)
    with pytest.raises(StrictDataclassError, match="layout_loss_weight must be >= 0"):
        canvas_pretraining_config(layout_loss_weight=-1.0)


@pytest.mark.parametrize(
    ("change", "argument"),
    [
        (dict(concept_input_ids=torch.ones(3, 2, 4, dtype=torch.long)), "concept_input_ids holds phrases for 3"),
        (dict(concept_attention_mask=torch.ones(4, 3, 5, dtype=torch.long)), "concept_attention_mask"),
        (dict(concept_input_ids=torch.ones(4, dtype=torch.long)), "concept_input_ids must be"),
        (dict(labels=torch.zeros(4, 3, 16, 16)), "images must be"),
    ],
)
def test_bad_input_names_the_argument(model, change, argument) -> None:
    with pytest.raises(ValueError, match=argument):
        model(**{**batch(), **change})


def test_config_rejects_a_detokenizer_of_another_token_width() -> None:
    with pytest.raises(StrictDataclassError, match="detokenizer_config.token_size"):
        SetokForPreTrainingConfig(
            setok_config=tiny_setok_config(), detokenizer_config=tiny_detokenizer_config(token_size=16)
        )
