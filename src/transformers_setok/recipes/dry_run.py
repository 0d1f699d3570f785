"""`setok train --dry-run`: each stage of a recipe built and sized without downloading a weight or taking a step.

A paper-size run needs a cluster, and minutes of loading before its first step, to tell you that a key was
misspelt, that the launcher's precision disagrees with the stage's, or that FSDP was told to wrap a layer class
the model does not have. The dry run finds those on any machine: for each stage it builds the model configs the
recipe builds, instantiates the model on the meta device (shapes without memory or weights), freezes and adapts it
as the stage does (`trainable`, `lora`), builds the stage's `TrainingArguments`, and checks an `accelerate launch`
config against them. Pretrained parts (`model.vision_model`, `model.text_model`, `model.detokenizer_model`,
`model.language_model`) are not downloaded: their architectures come from the configs a YAML carries beside their
ids (`model.setok_config.vision_config`, `model.text_config`, `model.detokenizer_config.unet_config`).

A stage that starts from an earlier one (2 from 1, 3 from 2) is built on that stage's saved config when `out`
holds it and it is not run now, as `setok train` would; otherwise on the recipe's YAML of that stage.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import launch_command_parser
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from peft import PeftModel, get_peft_model
from transformers import AutoConfig, AutoTokenizer, PreTrainedConfig, PreTrainedModel, TrainingArguments
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from ..configuration_mask_decoder import SetokimMaskDecoderConfig
from ..configuration_setok_detokenizer import SetokDetokenizerConfig
from ..configuration_setok_pretraining import SetokForPreTrainingConfig
from ..configuration_setokim import SetokimConfig
from ..modeling_setok_pretraining import SetokForPreTraining
from ..modeling_setokim import SetokimForConditionalGeneration
from ..part_learning_rates import PartLearningRates
from ..training import TRAINABLE_PARTS, language_model_lora_config, model_parts, set_trainable
from .recipe import (
    RECIPES_DIR,
    StageConfig,
    check_adapters_hold_what_trains,
    stage_config_path,
    stage_dir,
    training_arguments,
)

ACCELERATE_DIR = RECIPES_DIR / "accelerate"
# `[Img]`, `[/Img]` and `<image>`: added to the language model's tokenizer when the Setokim is composed.
IMAGE_MARKERS = 3
# The vocabulary of the tokenizer the recipe trains when `tokenizer.vocab_size` is not given.
DEFAULT_VOCAB_SIZE = 512
# What `recipe.py` reads of each section, so a misspelt key is an error instead of a default taken in silence.
DATA_KEYS = {
    1: {"seed", "num_scenes", "image_size", "max_phrases", "train_files", "image_folder"},
    2: {"seed", "num_scenes", "image_size", "tasks", "train_files", "image_folder", "max_length", "mask_size"},
}
DATA_KEYS[3] = DATA_KEYS[2]
TOKENIZER_KEYS = {1: {"name_or_path", "vocab_size"}, 2: set(), 3: set()}
PRETRAINED_PARTS = {1: {"vision_model", "text_model", "detokenizer_model"}, 2: {"language_model"}, 3: set()}
# diffusers parts of the detokenizer config, checked against their constructors.
DIFFUSERS_PARTS = {"unet_config": UNet2DConditionModel, "vae_config": AutoencoderKL, "scheduler_config": DDPMScheduler}
# Parameter-name prefixes of the stage-1 model's parts; the first that matches names a parameter's part.
PRETRAINING_PARTS = {
    "setok.vision_model.": "vision_encoder",
    "setok.": "merger",
    "detokenizer.": "detokenizer",
    "concept_head.text_model.": "phrase_encoder",
    "concept_head.": "concept_projection",
}


@dataclasses.dataclass
class PartSize:
    """Parameters of one part of a model: how many train in the stage, and how many in all."""

    trainable: int
    total: int

    @property
    def frozen(self) -> int:
        return self.total - self.trainable


@dataclasses.dataclass
class LaunchPlan:
    """What an `accelerate launch` config makes of a stage: its processes, precision and sharding."""

    path: Path
    num_processes: int
    num_machines: int
    mixed_precision: str
    sharding: str
    notes: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class StagePlan:
    """A stage as the dry run found it: its model's parts, its `TrainingArguments`, its batch and steps."""

    stage: int
    config_path: Path
    start: str
    model_class: str
    parts: dict[str, PartSize]
    arguments: TrainingArguments
    learning_rates: dict[str, float]
    launch: LaunchPlan | None
    examples: int | None
    data_note: str

    @property
    def world_size(self) -> int:
        return self.launch.num_processes if self.launch is not None else 1

    @property
    def global_batch_size(self) -> int:
        args = self.arguments
        return args.per_device_train_batch_size * args.gradient_accumulation_steps * self.world_size

    @property
    def steps(self) -> int | None:
        """Optimizer steps of the stage: `max_steps`, or its epochs over the examples as the `Trainer` counts them
        (each process takes every `world_size`-th batch of `per_device_train_batch_size`)."""
        args = self.arguments
        if args.max_steps > 0:
            return args.max_steps
        if self.examples is None:
            return None
        batches = math.ceil(math.ceil(self.examples / args.per_device_train_batch_size) / self.world_size)
        return math.ceil(args.num_train_epochs * max(math.ceil(batches / args.gradient_accumulation_steps), 1))

    @property
    def total(self) -> PartSize:
        return PartSize(
            sum(part.trainable for part in self.parts.values()), sum(part.total for part in self.parts.values())
        )


def dry_run(
    recipe: str | os.PathLike,
    stages: Sequence[int],
    out: str | os.PathLike,
    accelerate_config: str | os.PathLike | None = None,
) -> list[StagePlan]:
    """Plan `stages` of `recipe` (a shipped name or a folder) for the run folder `out`, launched by
    `accelerate_config` (a shipped name, "fsdp", "zero2", "multi_cpu", or a file) when given.

    Raises `FileNotFoundError` for a missing stage or launcher file, `ValueError` naming the file and key for a
    setting the run would reject or ignore.
    """
    out = Path(out)
    launch_path = None if accelerate_config is None else accelerate_config_path(accelerate_config)
    cluster = None if launch_path is None else read_accelerate_config(launch_path)
    configs = {stage: read_stage(recipe, stage) for stage in stages}
    plans = []
    for stage in stages:
        config, path = configs[stage]
        model, start = build_model(config, path, recipe, out, set(stages))
        arguments = stage_arguments(config, path, out, model)
        if arguments.activation_checkpointing and not base_model(model).supports_gradient_checkpointing:
            raise ValueError(
                f"{path}: training.activation_checkpointing: {type(base_model(model)).__name__} does not support "
                "activation checkpointing; leave it out"
            )
        if config.learning_rates:
            try:
                PartLearningRates(arguments, config.learning_rates)(model)
            except ValueError as error:
                raise ValueError(f"{path}: learning_rates: {error}") from error
        examples, data_note = count_examples(config, path)
        launch = None if cluster is None else check_launch(cluster, launch_path, stage, arguments, model)
        plans.append(
            StagePlan(
                stage=stage,
                config_path=path,
                start=start,
                model_class=type(base_model(model)).__name__,
                parts=part_sizes(model),
                arguments=arguments,
                learning_rates=config.learning_rates,
                launch=launch,
                examples=examples,
                data_note=data_note,
            )
        )
    return plans


def accelerate_config_path(name_or_path: str | os.PathLike) -> Path:
    """A shipped `accelerate` config by name ("fsdp", "zero2", "multi_cpu"), or a file."""
    shipped = ACCELERATE_DIR / f"{name_or_path}.yaml"
    path = shipped if shipped.is_file() else Path(name_or_path)
    if not path.is_file():
        names = sorted(p.stem for p in ACCELERATE_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"no accelerate config {str(name_or_path)!r}; give a file or one of {names}")
    return path


def read_accelerate_config(path: Path) -> ClusterConfig:
    """The config as `accelerate launch` reads it, with its FSDP and DeepSpeed keys checked against the launcher's
    own options (which it would otherwise drop without a word)."""
    try:
        cluster = load_config_from_file(str(path))
    except (ValueError, TypeError, yaml.YAMLError) as error:
        raise ValueError(f"{path}: not an accelerate config: {error}") from error
    if not isinstance(cluster, ClusterConfig):
        raise ValueError(f"{path}: a {cluster.compute_environment.value} config; the dry run checks local clusters")
    options = launcher_defaults()
    fsdp_keys = {key if key.startswith("fsdp") else f"fsdp_{key}" for key in cluster.fsdp_config}
    for section, keys in (("fsdp_config", fsdp_keys), ("deepspeed_config", set(cluster.deepspeed_config))):
        unknown = sorted(keys - set(options))
        if unknown:
            raise ValueError(f"{path}: {section}: unknown keys {unknown}; `accelerate launch --help` lists them")
    return cluster


def launcher_defaults() -> dict[str, Any]:
    """`accelerate launch`'s options and their defaults, which fill what a config leaves out."""
    return {action.dest: action.default for action in launch_command_parser()._actions}


def read_stage(recipe: str | os.PathLike, stage: int) -> tuple[StageConfig, Path]:
    path = stage_config_path(recipe, stage)
    config = StageConfig.from_file(path)
    if config.stage != stage:
        raise ValueError(f"{path}: says stage {config.stage}, but it is the recipe's stage{stage}.yaml")
    check_keys(config.data, DATA_KEYS[stage], f"{path}: data")
    check_keys(config.tokenizer, TOKENIZER_KEYS[stage], f"{path}: tokenizer")
    if stage == 1 and config.trainable:
        raise ValueError(f"{path}: trainable: stage 1 freezes by model.freeze_vision_model / freeze_text_model")
    if stage == 3 and config.model:
        raise ValueError(f"{path}: model: stage 3 starts from stage 2's model; its model keys would go unused")
    check_keys(config.trainable, TRAINABLE_PARTS, f"{path}: trainable")
    check_keys(config.learning_rates, TRAINABLE_PARTS, f"{path}: learning_rates")
    return config, path


def check_keys(values: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; expected some of {sorted(allowed)}")


def check_config_keys(values: Mapping[str, Any], config_class: type[PreTrainedConfig], where: str) -> None:
    """Reject keys `config_class` has no field for (a config would keep them as stray attributes), in its
    sub-configs too: Transformers configs by their `model_type`, diffusers parts by their constructors."""
    allowed = {field.name for field in dataclasses.fields(config_class)} | {"model_type"}
    check_keys(values, allowed, where)
    for name, spec in getattr(config_class, "sub_configs_defaults", {}).items():
        sub = values.get(name)
        if isinstance(sub, Mapping):
            sub_class = spec.config_class
            if sub_class is AutoConfig:
                model_type = sub.get("model_type", spec.model_type)
                if model_type not in CONFIG_MAPPING:
                    raise ValueError(f"{where}.{name}: unknown model_type {model_type!r}")
                sub_class = CONFIG_MAPPING[model_type]
            check_config_keys(sub, sub_class, f"{where}.{name}")
    if config_class is SetokDetokenizerConfig:
        for name, part in DIFFUSERS_PARTS.items():
            if isinstance(values.get(name), Mapping):
                check_keys(
                    values[name], set(inspect.signature(part.__init__).parameters) - {"self"}, f"{where}.{name}"
                )


def build_model(
    config: StageConfig, path: Path, recipe: str | os.PathLike, out: Path, planned: set[int]
) -> tuple[PreTrainedModel | PeftModel, str]:
    """The stage's model on the meta device, frozen and adapted as the stage trains it, and where it starts from."""
    if config.stage == 1:
        return on_meta(SetokForPreTraining, pretraining_config(config, path)), "a new model"
    previous = stage_dir(out, config.stage - 1)
    if config.stage - 1 not in planned and (previous / "config.json").is_file():
        config_class = SetokForPreTrainingConfig if config.stage == 2 else SetokimConfig
        previous_config, start = config_class.from_pretrained(previous), f"on the trained model in {previous}"
    else:
        try:
            earlier, earlier_path = read_stage(recipe, config.stage - 1)
            first, first_path = read_stage(recipe, 1)
        except FileNotFoundError as error:
            raise FileNotFoundError(
                f"stage {config.stage} starts from stage {config.stage - 1}'s model, which {previous} does not "
                f"hold yet, so the dry run builds it from the recipe: {error}"
            ) from error
        previous_config = pretraining_config(first, first_path)
        if config.stage == 3:
            previous_config = setokim_config(earlier, earlier_path, previous_config, out)
        start = f"on the model of {display_path(earlier_path)}"
    if config.stage == 2:
        model = on_meta(SetokimForConditionalGeneration, setokim_config(config, path, previous_config, out))
    else:
        model = on_meta(SetokimForConditionalGeneration, previous_config)
    if config.lora is not None:
        try:
            model = get_peft_model(model, language_model_lora_config(**config.lora))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: lora: {error}") from error
    set_trainable(model, **config.trainable)
    try:
        check_adapters_hold_what_trains(model)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error
    return model, start


def on_meta(model_class: type[PreTrainedModel], config: PreTrainedConfig) -> PreTrainedModel:
    """`model_class(config)` with every parameter on the meta device: its shapes, no memory and no weights."""
    with torch.device("meta"):
        return model_class(config)


def pretraining_config(config: StageConfig, path: Path) -> SetokForPreTrainingConfig:
    """The stage-1 config the recipe builds, with the architectures the YAML gives for its pretrained parts."""
    values = dict(config.model)
    check_keys(values, {f.name for f in dataclasses.fields(SetokForPreTrainingConfig)} | PRETRAINED_PARTS[1], path)
    vision_model, text_model = values.pop("vision_model", None), values.pop("text_model", None)
    if vision_model is not None and "vision_config" not in values.get("setok_config", {}):
        raise ValueError(
            f"{path}: model.vision_model ({vision_model}) is not downloaded in a dry run; give its architecture as "
            "model.setok_config.vision_config"
        )
    if text_model is not None and "text_config" not in values:
        raise ValueError(
            f"{path}: model.text_model ({text_model}) is not downloaded in a dry run; give its architecture as "
            "model.text_config"
        )
    detokenizer_model = values.pop("detokenizer_model", None)
    if detokenizer_model is not None and "unet_config" not in values.get("detokenizer_config", {}):
        raise ValueError(
            f"{path}: model.detokenizer_model ({detokenizer_model}) is not downloaded in a dry run; give its "
            "architecture as model.detokenizer_config.unet_config (and vae_config, scheduler_config)"
        )
    check_config_keys(values, SetokForPreTrainingConfig, f"{path}: model")
    if text_model is None:  # the phrase encoder reads the tokenizer the recipe trains
        values["text_config"] = {
            **values.get("text_config", {}),
            "vocab_size": config.tokenizer.get("vocab_size", DEFAULT_VOCAB_SIZE),
        }
    try:
        return SetokForPreTrainingConfig(**values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: model: {error}") from error


def setokim_config(
    config: StageConfig, path: Path, pretraining: SetokForPreTrainingConfig, out: Path
) -> SetokimConfig:
    """The stage-2 config the recipe composes from stage 1's tokenizer and detokenizer and `model`'s language
    model, whose vocabulary grows by the image markers."""
    values = dict(config.model)
    check_keys(values, {f.name for f in dataclasses.fields(SetokimConfig)} | PRETRAINED_PARTS[2], f"{path}: model")
    text_config, language_model = values.pop("text_config", None), values.pop("language_model", None)
    if text_config is None:
        needed = f"the architecture of {language_model}" if language_model is not None else "the language model"
        raise ValueError(f"{path}: model.text_config is needed: {needed}")
    check_config_keys(values | {"text_config": text_config}, SetokimConfig, f"{path}: model")
    if language_model is not None:
        if "vocab_size" not in text_config:
            raise ValueError(f"{path}: model.text_config.vocab_size is needed: the vocabulary of {language_model}")
        vocab_size = text_config["vocab_size"]
    elif (out / "tokenizer" / "tokenizer_config.json").is_file():
        vocab_size = len(AutoTokenizer.from_pretrained(out / "tokenizer"))
    else:
        vocab_size = DEFAULT_VOCAB_SIZE
    mask_decoder = values.pop("mask_decoder_config", None)
    try:
        return SetokimConfig(
            setok_config=pretraining.setok_config,
            text_config={**text_config, "vocab_size": vocab_size + IMAGE_MARKERS},
            vision_output_head=True,
            detokenizer_config=pretraining.detokenizer_config,
            mask_decoder_config=None if mask_decoder is None else SetokimMaskDecoderConfig(**mask_decoder),
            **values,
        )
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: model: {error}") from error


def base_model(model: PreTrainedModel | PeftModel) -> PreTrainedModel:
    return model.get_base_model() if isinstance(model, PeftModel) else model


def part_sizes(model: PreTrainedModel | PeftModel) -> dict[str, PartSize]:
    """Trainable and total parameters per part (a tied weight counted once): a Setokim's parts as
    `set_trainable` names them, the stage-1 model's by `PRETRAINING_PARTS`."""
    if isinstance(base_model(model), SetokForPreTraining):
        groups: dict[str, dict[int, torch.nn.Parameter]] = {part: {} for part in PRETRAINING_PARTS.values()}
        for name, parameter in model.named_parameters():
            part = next(part for prefix, part in PRETRAINING_PARTS.items() if name.startswith(prefix))
            groups[part][id(parameter)] = parameter
    else:
        groups = {
            part: {id(p): p for module in modules for p in module.parameters()}
            for part, modules in model_parts(model).items()
        }
    return {
        part: PartSize(
            sum(p.numel() for p in params.values() if p.requires_grad), sum(map(torch.numel, params.values()))
        )
        for part, params in groups.items()
    }


def stage_arguments(
    config: StageConfig, path: Path, out: Path, model: PreTrainedModel | PeftModel
) -> TrainingArguments:
    """The stage's `TrainingArguments` as the recipe builds them for `model`. On a machine without a GPU, a stage
    that trains in bf16 or fp16 is checked with `use_cpu` (Transformers refuses mixed precision without a GPU
    otherwise)."""
    training = config.training
    if not torch.cuda.is_available() and (training.get("bf16") or training.get("fp16")):
        config = dataclasses.replace(config, training={**training, "use_cpu": True})
    try:
        return training_arguments(config, stage_dir(out, config.stage), model)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: training: {error}") from error


def count_examples(config: StageConfig, path: Path) -> tuple[int | None, str]:
    """The stage's training examples, when they can be counted here, and where they come from."""
    files = config.data.get("train_files")
    if files is None:
        if config.stage == 1:  # one captioned image per scene
            return config.data["num_scenes"], f"the shapes world, {config.data['num_scenes']} scenes"
        return None, f"the shapes world, {config.data.get('num_scenes')} scenes, tasks {dict(config.data['tasks'])}"
    files = [files] if isinstance(files, str) else list(files)
    missing = [name for name in files if not Path(name).is_file()]
    if missing:
        return None, f"data.train_files: {len(missing)} of {len(files)} files not found here"
    count = 0
    for name in files:
        with open(name) as handle:
            if name.endswith(".jsonl"):
                count += sum(1 for line in handle if line.strip())
            else:
                records = json.load(handle)
                if not isinstance(records, list):
                    raise ValueError(
                        f"{path}: data.train_files: {name} holds a JSON {type(records).__name__}, not a list"
                    )
                count += len(records)
    return count, f"data.train_files, {plural(len(files), 'file', 'files')}"


def check_launch(
    cluster: ClusterConfig, path: Path, stage: int, arguments: TrainingArguments, model: PreTrainedModel | PeftModel
) -> LaunchPlan:
    """The launcher's plan for the stage; a `ValueError` listing every setting that disagrees with the stage (what
    `accelerate launch` or the `Trainer` would stop at, or run differently from what the stage asks)."""
    problems, notes = [], []
    wanted = "bf16" if arguments.bf16 else "fp16" if arguments.fp16 else "no"
    mixed_precision = cluster.mixed_precision or "no"
    if mixed_precision != wanted:
        problems.append(
            f"mixed_precision is {mixed_precision!r} but stage {stage} trains with {wanted!r} (training.bf16 "
            f"{arguments.bf16}, training.fp16 {arguments.fp16}); make them agree"
        )
    if cluster.num_processes < 1:
        problems.append("num_processes is not set: the global batch size depends on it")
    distributed_type = cluster.distributed_type.value
    if distributed_type == "FSDP":
        sharding = check_fsdp(cluster, stage, arguments, model, problems)
    elif distributed_type == "DEEPSPEED":
        sharding = check_deepspeed(cluster, stage, arguments, problems, notes)
    elif distributed_type == "MULTI_CPU" and cluster.num_processes > 1 and not cluster.mpirun_config:
        problems.append(
            "distributed_type MULTI_CPU starts several processes through mpirun only (mpirun_config), one without "
            "it; use MULTI_GPU with use_cpu: true, as multi_cpu.yaml does"
        )
        sharding = "DDP"
    else:
        sharding = "DDP over gloo on the CPU" if cluster.use_cpu else "DDP" if cluster.num_processes > 1 else "none"
    if problems:
        raise ValueError(f"{path} does not fit stage {stage}: " + "; ".join(problems))
    return LaunchPlan(path, cluster.num_processes, cluster.num_machines, mixed_precision, sharding, notes)


def check_fsdp(
    cluster: ClusterConfig,
    stage: int,
    arguments: TrainingArguments,
    model: PreTrainedModel | PeftModel,
    problems: list,
) -> str:
    fsdp = launcher_defaults() | {
        key if key.startswith("fsdp") else f"fsdp_{key}": v for key, v in cluster.fsdp_config.items()
    }
    version = int(fsdp["fsdp_version"])
    if version == 1:  # the launcher hands FSDP1 its sharding strategy
        sharding = f"FSDP1 {fsdp['fsdp_sharding_strategy']}"
    else:
        resharding = "resharding" if str_to_bool(fsdp["fsdp_reshard_after_forward"]) else "no resharding"
        sharding = f"FSDP2 {resharding} after forward"
    policy = fsdp["fsdp_auto_wrap_policy"]
    if policy == "TRANSFORMER_BASED_WRAP":
        wrapped = fsdp["fsdp_transformer_layer_cls_to_wrap"]
        names = wrapped.split(",") if wrapped else list(getattr(base_model(model), "_no_split_modules", None) or [])
        classes = [type(module).__name__ for module in model.modules()]
        missing = [name for name in names if name not in classes]
        if missing:
            layers = sorted({name for name in classes if name.endswith("Layer")})
            problems.append(
                f"fsdp_transformer_layer_cls_to_wrap names {missing}, which stage {stage}'s model does not have "
                f"(its layer classes: {layers})"
            )
        sharding += ", one unit per " + ", ".join(f"{name} ({classes.count(name)})" for name in names)
    elif policy == "SIZE_BASED_WRAP":
        sharding += f", units of at least {fsdp['fsdp_min_num_params']} parameters"
    trainable = {parameter.requires_grad for parameter in model.parameters()}
    if version == 1 and len(trainable) == 2 and not str_to_bool(fsdp["fsdp_use_orig_params"]):
        problems.append(
            f"fsdp_use_orig_params is off, but stage {stage} trains some parameters and freezes others, which FSDP1's "
            "flat parameters mix only with fsdp_use_orig_params: true"
        )
    if str_to_bool(fsdp["fsdp_activation_checkpointing"]) and arguments.activation_checkpointing:
        problems.append(
            "fsdp_activation_checkpointing and the stage's training.activation_checkpointing are both on; the Trainer "
            "takes one of them"
        )
    return sharding


def check_deepspeed(
    cluster: ClusterConfig, stage: int, arguments: TrainingArguments, problems: list, notes: list
) -> str:
    """ZeRO settings from the config alone, without importing DeepSpeed (often not installed where one checks)."""
    settings = dict(cluster.deepspeed_config)
    expected = {
        "gradient_accumulation_steps": arguments.gradient_accumulation_steps,
        "gradient_clipping": arguments.max_grad_norm,
    }
    if settings.get("deepspeed_config_file"):
        with open(settings["deepspeed_config_file"]) as handle:
            file = json.load(handle)
        zero_stage = file.get("zero_optimization", {}).get("stage", 0)
        expected["train_micro_batch_size_per_gpu"] = arguments.per_device_train_batch_size
        for name, wanted in (("bf16", arguments.bf16), ("fp16", arguments.fp16)):
            enabled = file.get(name, {}).get("enabled", False)
            if enabled != "auto" and bool(enabled) != wanted:
                problems.append(
                    f"{settings['deepspeed_config_file']}: {name}.enabled is {enabled} but training.{name} is {wanted}"
                )
        values = file
    else:
        zero_stage = int(settings.get("zero_stage", 2))
        values = settings
    for name, wanted in expected.items():
        value = values.get(name, "auto")
        if value != "auto" and float(value) != float(wanted):
            problems.append(
                f"deepspeed {name} is {value} but stage {stage}'s TrainingArguments say {wanted}; write auto"
            )
    if importlib.util.find_spec("deepspeed") is None:
        notes.append("deepspeed is not installed here: its settings were read, not run (pip install deepspeed)")
    return f"DeepSpeed ZeRO-{zero_stage}"


def str_to_bool(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("true", "1", "yes")


def display_path(path: Path) -> str:
    """A shipped file relative to the recipes folder (the same on every machine), any other as given."""
    try:
        return str(path.resolve().relative_to(RECIPES_DIR))
    except ValueError:
        return str(path)


def plural(count: float, one: str, many: str) -> str:
    return f"{count:g} {one if count == 1 else many}"


def format_report(plans: Sequence[StagePlan]) -> str:
    """The dry run's report: per stage, its parameters per part, batch, steps, precision and launcher."""
    lines = []
    for plan in plans:
        args = plan.arguments
        lines.append(f"stage {plan.stage}: {plan.model_class}, {display_path(plan.config_path)}, {plan.start}")
        lines.append(f"  {'part':<20}{'trainable':>15}{'frozen':>16}")
        for name, size in [*plan.parts.items(), ("total", plan.total)]:
            lines.append(f"  {name:<20}{size.trainable:>15,}{size.frozen:>16,}")
        lines.append(
            f"  batch: {args.per_device_train_batch_size} per device x {args.gradient_accumulation_steps} "
            f"accumulated x {plural(plan.world_size, 'process', 'processes')} = {plan.global_batch_size}"
        )
        epochs = plural(args.num_train_epochs, "epoch", "epochs")
        if args.max_steps > 0:
            lines.append(f"  steps: {plan.steps} (max_steps)")
        elif plan.steps is not None:
            lines.append(f"  steps: {plan.steps} ({epochs} of {plan.examples:,} examples)")
        else:
            lines.append(f"  steps: {epochs} of examples not counted here")
        lines.append(f"  data: {plan.data_note}")
        precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
        rates = "".join(f", {part} {rate:g}" for part, rate in plan.learning_rates.items())
        lines.append(
            f"  precision: {precision}, learning rate {args.learning_rate:g}{rates}, {args.lr_scheduler_type.value}"
        )
        if plan.launch is not None:
            launch = plan.launch
            processes = plural(launch.num_processes, "process", "processes")
            machines = plural(launch.num_machines, "machine", "machines")
            lines.append(f"  launch: {display_path(launch.path)}: {launch.sharding}; {processes} on {machines}")
            lines += [f"  note: {note}" for note in launch.notes]
    return "\n".join(lines)


__all__ = [
    "ACCELERATE_DIR",
    "LaunchPlan",
    "PartSize",
    "StagePlan",
    "accelerate_config_path",
    "dry_run",
    "format_report",
]
