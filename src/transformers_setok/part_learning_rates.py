"""Training parts of a Setokim at their own learning rates with the stock `Trainer`.

A part trained from where it already works (a pretrained vision encoder, the merger of a trained tokenizer) wants
a smaller step than parts that start fresh (LoRA adapters, the heads), as LLaVA's `mm_projector_lr` does for its
projector. The `Trainer` builds one learning rate for all; its `optimizer_cls_and_kwargs` takes an optimizer
factory instead, which gets the model as the `Trainer` prepared it (wrapped by FSDP where that delays the
optimizer), so the parameter groups are made from the parameters that really train.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.trainer_pt_utils import get_parameter_names

from .training import TRAINABLE_PARTS, model_parts

# `get_optimizer_cls_and_kwargs` keys that replace the parameter groups (GaLore, LOMO, layer-wise optimizers).
REPLACED_GROUPS = ("params", "model", "optimizer_dict")
# Parameter names the `Trainer` keeps out of weight decay (`Trainer.get_decay_parameter_names`), beside `LayerNorm`s.
NO_DECAY_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")


class PartLearningRates:
    """Builds the `TrainingArguments`' optimizer (`optim`, its betas, epsilon and weight decay) over parameter
    groups: each part named in `learning_rates` (a `set_trainable` part: `vision_encoder`, `merger`, `projector`,
    `language_model`, `vision_head`, `mask_decoder`, `detokenizer`) at its rate, everything else at
    `args.learning_rate`. The `Trainer`'s scheduler scales every group alike, so warmup and decay keep the ratios;
    its logged `learning_rate` is that of the first group, the rest. Weight decay spares biases and norms, as the
    `Trainer`'s does."""

    def __init__(self, args: TrainingArguments, learning_rates: Mapping[str, float]) -> None:
        bad = {part: rate for part, rate in learning_rates.items() if not isinstance(rate, (int, float)) or rate < 0}
        if bad:
            raise ValueError(
                f"learning rates are numbers of at least 0, got {bad} (YAML reads 1e-4 as text; write 1.0e-4)"
            )
        self.args = args
        self.learning_rates = dict(learning_rates)

    def __call__(self, model: nn.Module) -> torch.optim.Optimizer:
        optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, model)
        if not isinstance(optimizer_cls, type) or any(key in optimizer_kwargs for key in REPLACED_GROUPS):
            raise ValueError(
                f"optim={self.args.optim!r} builds its own parameter groups; per-part learning rates need an "
                "optimizer over plain groups (adamw_torch, adamw_torch_fused, sgd, ...)"
            )
        part_of = {
            id(parameter): part
            for part, modules in model_parts(extract_model_from_parallel(model)).items()
            if part in self.learning_rates
            for module in modules
            for parameter in module.parameters()
        }
        decayed = set(get_parameter_names(model, [nn.LayerNorm], NO_DECAY_PATTERNS))
        groups: dict[tuple[str | None, bool], list[nn.Parameter]] = {}
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                groups.setdefault((part_of.get(id(parameter)), name in decayed), []).append(parameter)
        untrained = sorted(set(self.learning_rates) - {part for part, _ in groups})
        if untrained:
            raise ValueError(
                f"learning_rates names {untrained}, which train no parameter here: set them trainable (under FSDP, "
                "with use_orig_params, so that parameters keep their own tensors)"
            )
        return optimizer_cls(
            [
                {
                    "params": parameters,
                    "lr": self.args.learning_rate if part is None else self.learning_rates[part],
                    "weight_decay": self.args.weight_decay if decay else 0.0,
                }
                # The rest first: the group whose rate the `Trainer` logs.
                for (part, decay), parameters in sorted(groups.items(), key=lambda item: item[0][0] is not None)
            ],
            **optimizer_kwargs,
        )


def part_learning_rates(
    args: TrainingArguments, learning_rates: Mapping[str, float]
) -> tuple[partial[PartLearningRates], dict[str, Any]]:
    """`Trainer(..., optimizer_cls_and_kwargs=part_learning_rates(args, {"vision_encoder": 1e-4}))`: train the
    named parts of a Setokim (or a `PeftModel` of one) at their own learning rates, the rest at
    `args.learning_rate` (see `PartLearningRates`)."""
    unknown = sorted(set(learning_rates) - set(TRAINABLE_PARTS))
    if unknown:
        raise ValueError(f"learning_rates: unknown parts {unknown}; the parts are {sorted(TRAINABLE_PARTS)}")
    return partial(PartLearningRates, args, learning_rates), {}


__all__ = ["PartLearningRates", "part_learning_rates"]
