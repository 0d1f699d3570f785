"""Per-part learning rates through the stock `Trainer`: a step moves each part by its own rate, weight decay spares
what the `Trainer`'s spares, LoRA's trained copies get their part's rate, and misnamed or frozen parts are refused."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize_weights, setokim_for
from peft import get_peft_model
from transformers import AutoTokenizer, Trainer, TrainingArguments

from transformers_setok import SetokImageProcessor, SetokimProcessor
from transformers_setok.part_learning_rates import PartLearningRates, part_learning_rates
from transformers_setok.training import SetokimDataCollator, language_model_lora_config, model_parts, set_trainable

RATES = {"vision_encoder": 0.01, "merger": 0.003}
BASE_RATE = 0.1


@pytest.fixture
def processor(tiny_tokenizer_dir: Path) -> SetokimProcessor:
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tokenizer.padding_side = "right"
    return SetokimProcessor(SetokImageProcessor(size={"height": 64, "width": 64}), tokenizer)


def examples() -> list[dict]:
    rng = np.random.default_rng(0)
    return [
        {
            "images": [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)],
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]},
            ],
        }
        for answer in ("A red circle.", "Two blue squares.")
    ]


def arguments(tmp_path: Path, **overrides) -> TrainingArguments:
    settings = dict(
        optim="sgd",  # an update that is `-lr * gradient`, nothing else
        learning_rate=BASE_RATE,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,  # no clipping either
        max_steps=1,
        per_device_train_batch_size=2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    return TrainingArguments(output_dir=str(tmp_path), **(settings | overrides))


def part_of_each_name(model: torch.nn.Module) -> dict[str, str]:
    ids = {id(p): part for part, modules in model_parts(model).items() for m in modules for p in m.parameters()}
    return {name: ids.get(id(parameter), "other") for name, parameter in model.named_parameters()}


def test_one_trainer_step_moves_each_part_by_its_own_rate(processor: SetokimProcessor, tmp_path: Path) -> None:
    model = randomize_weights(setokim_for(processor), seed=3)
    set_trainable(model, vision_encoder=True)
    collator = SetokimDataCollator(processor)
    # The reference: plain gradients of the same batch on a copy, no Trainer and no optimizer.
    reference = copy.deepcopy(model).train()
    reference(**collator(examples())).loss.backward()
    gradients = {  # a trained part the batch leaves out (the vision head) gets none
        name: torch.zeros_like(p) if p.grad is None else p.grad
        for name, p in reference.named_parameters()
        if p.requires_grad
    }
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    args = arguments(tmp_path)
    Trainer(
        model=model,
        args=args,
        train_dataset=examples(),
        data_collator=collator,
        optimizer_cls_and_kwargs=part_learning_rates(args, RATES),
    ).train()

    parts = part_of_each_name(model)
    assert {parts[name] for name in gradients} >= {"vision_encoder", "merger", "projector", "language_model"}
    for name, parameter in model.named_parameters():
        step = parameter.detach() - before[name]
        if name not in gradients:
            assert torch.equal(step, torch.zeros_like(step)), name
            continue
        rate = RATES.get(parts[name], BASE_RATE)
        torch.testing.assert_close(step, -rate * gradients[name], rtol=1e-3, atol=1e-7, msg=name)


def group_of_each_parameter(optimizer: torch.optim.Optimizer) -> dict[int, dict]:
    return {id(p): group for group in optimizer.param_groups for p in group["params"]}


def test_weight_decay_spares_what_the_trainers_own_optimizer_spares(processor: SetokimProcessor, tmp_path) -> None:
    model = setokim_for(processor)
    set_trainable(model, vision_encoder=True)
    args = arguments(tmp_path, optim="adamw_torch", weight_decay=0.05)
    optimizer = PartLearningRates(args, RATES)(model)
    decayed = set(Trainer(model=model, args=args).get_decay_parameter_names(model))
    groups = group_of_each_parameter(optimizer)
    parts = part_of_each_name(model)
    assert type(optimizer) is torch.optim.AdamW
    assert optimizer.param_groups[0]["lr"] == BASE_RATE  # the rate the Trainer logs is the rest's
    exempt = 0
    for name, parameter in model.named_parameters():
        group = groups[id(parameter)]
        assert group["weight_decay"] == (0.05 if name in decayed else 0.0), name
        assert group["lr"] == RATES.get(parts[name], BASE_RATE), name
        exempt += name not in decayed
    assert 0 < exempt < len(groups)


def test_lora_copies_train_at_their_parts_rate_and_their_originals_not_at_all(processor: SetokimProcessor) -> None:
    config = language_model_lora_config(modules_to_save=["multi_modal_projector", "setok"])
    model = get_peft_model(setokim_for(processor), config)
    set_trainable(model, vision_encoder=True)
    optimizer = PartLearningRates(arguments(Path("unused")), {"vision_encoder": 0.01, "projector": 0.02})(model)
    groups = group_of_each_parameter(optimizer)
    seen = {"vision_encoder": 0, "projector": 0, "lora": 0}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            assert id(parameter) not in groups, name
        elif ".setok.modules_to_save.default.vision_model." in name:
            assert groups[id(parameter)]["lr"] == 0.01, name
            seen["vision_encoder"] += 1
        elif ".multi_modal_projector.modules_to_save.default." in name:
            assert groups[id(parameter)]["lr"] == 0.02, name
            seen["projector"] += 1
        elif "lora_" in name:
            assert groups[id(parameter)]["lr"] == BASE_RATE, name
            seen["lora"] += 1
    assert all(seen.values()), seen


def test_unknown_and_frozen_parts_and_grouping_optimizers_are_refused(
    processor: SetokimProcessor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = arguments(tmp_path)
    with pytest.raises(ValueError, match=r"unknown parts \['vision_tower'\]"):
        part_learning_rates(args, {"vision_tower": 1e-4})
    with pytest.raises(ValueError, match=r"got \{'merger': '1e-4'\} \(YAML reads 1e-4 as text"):
        PartLearningRates(args, {"merger": "1e-4", "projector": 1e-4})
    model = setokim_for(processor)
    set_trainable(model)  # the vision encoder stays frozen
    with pytest.raises(ValueError, match=r"names \['vision_encoder'\], which train no parameter here"):
        PartLearningRates(args, {"vision_encoder": 1e-4})(model)

    def low_rank_optimizer(args: TrainingArguments, model: torch.nn.Module) -> tuple[type, dict]:
        return torch.optim.AdamW, {"params": [], "lr": args.learning_rate}

    monkeypatch.setattr(Trainer, "get_optimizer_cls_and_kwargs", staticmethod(low_rank_optimizer))
    with pytest.raises(ValueError, match="builds its own parameter groups"):
        PartLearningRates(args, {"merger": 1e-4})(model)
