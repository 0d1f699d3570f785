"""The paper's three training stages as one recipe on the stock `Trainer`, each stage a YAML file.

    stage 1  SetokForPreTraining: the tokenizer (encoder + merger) and the detokenizer, by reconstruction and the
             concept-level contrastive loss (`SetokPretrainingCollator`).
    stage 2  multimodal pretraining of a Setokim built from the stage-1 tokenizer and a language model: captions
             (image -> text) and text-to-image (text -> vision tokens), tokenizer frozen.
    stage 3  instruction tuning with LoRA on the language model: questions, referring segmentation, editing (and
             some of stage 2's tasks, so drawing is not forgotten); the adapters are merged into the final model.

A run folder holds `tokenizer/` (trained on the world's texts when the recipe makes its own) and one folder per
stage: the stage's model and processor, `checkpoints/` from which an interrupted stage resumes, and in stage 3
`adapter/`, the LoRA adapters merged into its model. A stage reads
the previous stage's folder, so `setok train --stage 2 --out run/` continues where `--stage 1 --out run/` ended.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
import yaml
from peft import PeftModel, get_peft_model
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import CONFIG_NAME, cached_file, logging

from ..configuration_mask_decoder import SetokimMaskDecoderConfig
from ..configuration_setok_pretraining import SetokForPreTrainingConfig
from ..image_processing_setok import SetokImageProcessor
from ..modeling_setok_detokenizer import SetokDetokenizer
from ..modeling_setok_pretraining import SetokForPreTraining
from ..modeling_setokim import SetokimForConditionalGeneration, load_setok
from ..part_learning_rates import part_learning_rates
from ..processing_setokim import SetokimProcessor
from ..shapes_world import TASKS, shapes_world
from ..tokenizer_training import train_sentencepiece_tokenizer
from ..training import SetokimDataCollator, language_model_lora_config, model_parts, set_trainable
from .world_data import SetokPretrainingCollator, chat_examples, world_texts

logger = logging.get_logger(__name__)

RECIPES_DIR = Path(__file__).resolve().parent
STAGES = (1, 2, 3)
# Parts of a detokenizer config that a pretrained detokenizer brings with its weights.
DIFFUSERS_CONFIGS = ("unet_config", "vae_config", "scheduler_config")
# Where stage 3 saves its trained LoRA adapters (inside the stage's folder), which it then merges into its model.
ADAPTER_DIR = "adapter"


@dataclass
class StageConfig:
    """One stage of a recipe, as its YAML file writes it.

    Attributes:
        stage: 1, 2 or 3.
        data: the shapes world to train on (`seed`, `num_scenes`, `image_size`) and, for stages 2 and 3, `tasks`:
            how many times each task's records are used (a fraction uses the first ones).
        training: `TrainingArguments` keywords; `output_dir` is the stage's `checkpoints/` folder.
        model: stage 1: `SetokForPreTrainingConfig` keywords (`text_config` without its vocabulary, which the
            tokenizer sets) and the pretrained parts to start from, `vision_model`, `text_model` and
            `detokenizer_model` (a Stable Diffusion folder or Hub id, or a saved `SetokDetokenizer`); stage 2:
            `text_config` of the language model built from scratch, `projector_type`, `mask_decoder_config` and
            the `SetokimConfig` loss weights.
        tokenizer: stage 1: the `vocab_size` of the tokenizer trained on the world's texts.
        trainable: stages 2 and 3: `set_trainable` keywords.
        learning_rates: stages 2 and 3: a learning rate of its own for some trainable parts (`set_trainable`'s
            names), the rest learning at `training.learning_rate` (`part_learning_rates`).
        lora: stage 3: `language_model_lora_config` keywords.
        seed: seed of the model's initialisation and the data order.
    """

    stage: int
    data: dict[str, Any]
    training: dict[str, Any]
    model: dict[str, Any] = field(default_factory=dict)
    tokenizer: dict[str, Any] = field(default_factory=dict)
    trainable: dict[str, Any] = field(default_factory=dict)
    learning_rates: dict[str, float] = field(default_factory=dict)
    lora: dict[str, Any] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.lora is not None and self.stage != 3:
            raise ValueError(f"lora is stage 3's (instruction tuning), got it in stage {self.stage}")
        if self.learning_rates and self.stage == 1:
            raise ValueError("learning_rates are for the parts of a Setokim, stages 2 and 3; stage 1 has one rate")

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> StageConfig:
        with open(path) as handle:
            values = yaml.safe_load(handle)
        if not isinstance(values, dict):
            raise ValueError(f"{path}: a stage config is a YAML mapping, got {type(values).__name__}")
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}; a stage config has {sorted(cls.__dataclass_fields__)}")
        return cls(**values)


def stage_config_path(recipe: str | os.PathLike, stage: int) -> Path:
    """`recipe`'s file for `stage`: a recipe shipped with the package by name ("tiny", "paper"), or a folder of
    `stage1.yaml`, `stage2.yaml`, `stage3.yaml`."""
    folder = RECIPES_DIR / str(recipe) if (RECIPES_DIR / str(recipe)).is_dir() else Path(recipe)
    path = folder / f"stage{stage}.yaml"
    if not path.is_file():
        shipped = sorted(p.name for p in RECIPES_DIR.iterdir() if (p / "stage1.yaml").is_file())
        raise FileNotFoundError(f"no {path.name} in {folder}; give a recipe folder or one of {shipped}")
    return path


def stage_dir(out: str | os.PathLike, stage: int) -> Path:
    return Path(out) / f"stage{stage}"


def training_arguments(
    config: StageConfig, out: Path, model: SetokimForConditionalGeneration | PeftModel | None = None
) -> TrainingArguments:
    """The stage's `TrainingArguments`; for stages 2 and 3, those of training `model` (frozen and adapted as the
    stage trains it). Processes launched by `torchrun` or `accelerate launch` on a machine without CUDA form one DDP
    job (gloo) only with `use_cpu`: without it each process would train alone on all the data. DDP is told to look
    for parameters a batch leaves without a gradient where some may (`ddp_find_unused_parameters`, which the
    `Trainer` leaves off for a model with activation checkpointing); the YAML's `training` overrides both."""
    several_cpu_processes = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    values = {"report_to": "none", "save_total_limit": 1, "use_cpu": several_cpu_processes}
    if config.stage != 1 and model is not None and some_batches_skip_trainable_parts(model):
        values["ddp_find_unused_parameters"] = True
    values |= config.training
    values["seed"] = config.seed
    return TrainingArguments(output_dir=str(out / "checkpoints"), remove_unused_columns=False, **values)


def some_batches_skip_trainable_parts(model: SetokimForConditionalGeneration | PeftModel) -> bool:
    """Whether a Setokim trains a part that a batch may not reach: any but its language model (a text-only batch
    skips the vision side and the projector, captions the vision head, all but referring examples the mask
    decoder)."""
    return any(
        parameter.requires_grad
        for part, modules in model_parts(model).items()
        if part != "language_model"
        for module in modules
        for parameter in module.parameters()
    )


def run_trainer(trainer: Trainer, config: StageConfig, out: Path) -> None:
    """Train, resuming from the newest checkpoint in `out/checkpoints` when there is one; save the loss log and
    the stage's config beside the model."""
    checkpoint = get_last_checkpoint(trainer.args.output_dir) if os.path.isdir(trainer.args.output_dir) else None
    if checkpoint is not None:
        logger.warning(f"Resuming from {checkpoint}")
    trainer.train(resume_from_checkpoint=checkpoint)
    if trainer.is_world_process_zero():
        metrics = [entry for entry in trainer.state.log_history if "loss" in entry or "train_loss" in entry]
        (out / "training_log.json").write_text(json.dumps(metrics, indent=1))
        (out / "recipe.yaml").write_text(yaml.safe_dump(asdict(config), sort_keys=False))


def world_for(config: StageConfig, tasks: tuple[str, ...]) -> datasets.DatasetDict:
    data = config.data
    return shapes_world(data.get("seed", 0), data["num_scenes"], data.get("image_size", 64), tasks=tasks)


def data_files(config: StageConfig) -> datasets.Dataset | None:
    """A user's own training data, `data.train_files` (JSON or JSON Lines), or `None` to train on the world."""
    files = config.data.get("train_files")
    return None if files is None else datasets.load_dataset("json", data_files=files, split="train")


def text_tokenizer(config: StageConfig, out: Path, args: TrainingArguments) -> PreTrainedTokenizerBase:
    """The run's tokenizer: `tokenizer.name_or_path`, or one the main process trains on the world's texts (every
    task's, so later stages read them in few pieces), which every process then loads from `out/tokenizer`. The
    processes are those of `args`, the stage's `TrainingArguments`, so they are the ones its `Trainer` runs."""
    if config.tokenizer.get("name_or_path") is not None:
        return AutoTokenizer.from_pretrained(config.tokenizer["name_or_path"])
    folder = out / "tokenizer"
    with args.main_process_first(local=False, desc="training the tokenizer"):
        if not (folder / "tokenizer_config.json").is_file():
            texts = world_texts(world_for(config, TASKS))
            train_sentencepiece_tokenizer(texts, folder, config.tokenizer.get("vocab_size", 512))
        return AutoTokenizer.from_pretrained(folder)


def pretraining_model(config: StageConfig, tokenizer: PreTrainedTokenizerBase) -> SetokForPreTraining:
    """The stage-1 model: built from `model`, its encoder, phrase encoder and detokenizer loaded from
    `model.vision_model`, `model.text_model` and `model.detokenizer_model` when given (the paper's SigLIP, a
    Stable Diffusion), trained from scratch otherwise."""
    model_config = dict(config.model)
    vision_model, text_model = model_config.pop("vision_model", None), model_config.pop("text_model", None)
    detokenizer_model = model_config.pop("detokenizer_model", None)
    setok = None
    if vision_model is not None:
        setok_kwargs = {k: v for k, v in model_config.get("setok_config", {}).items() if k != "vision_config"}
        setok = load_setok(vision_model, **setok_kwargs)
        model_config["setok_config"] = setok.config
    text = AutoModel.from_pretrained(text_model) if text_model is not None else None
    if text is not None:
        model_config["text_config"] = text.config
    else:
        model_config["text_config"] = {
            **model_config.get("text_config", {}),
            "vocab_size": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
        }
    set_seed(config.seed)
    detokenizer = None
    if detokenizer_model is not None:
        detokenizer = pretrained_detokenizer(detokenizer_model, model_config.get("detokenizer_config", {}))
        model_config["detokenizer_config"] = detokenizer.config
    model = SetokForPreTraining(SetokForPreTrainingConfig(**model_config))
    if setok is not None:
        model.setok.load_state_dict(setok.state_dict())
    if text is not None:
        model.concept_head.text_model.load_state_dict(text.state_dict())
    if detokenizer is not None:
        model.detokenizer.load_state_dict(detokenizer.state_dict())
    return model


def pretrained_detokenizer(name_or_path: str | os.PathLike, settings: dict[str, Any]) -> SetokDetokenizer:
    """A saved `SetokDetokenizer` (a folder or Hub id with its `config.json`), or else a Stable-Diffusion-style
    one's U-Net, VAE and noise schedule (`SetokDetokenizer.from_stable_diffusion`). The U-Net, VAE and schedule
    configs are the loaded ones; `settings` (the YAML's `detokenizer_config`) sets the rest, `token_size` first."""
    settings = {key: value for key, value in settings.items() if key not in DIFFUSERS_CONFIGS}
    if cached_file(name_or_path, CONFIG_NAME, _raise_exceptions_for_missing_entries=False) is not None:
        return SetokDetokenizer.from_pretrained(name_or_path, **settings)
    if "token_size" not in settings:
        raise ValueError(
            f"model.detokenizer_config.token_size is needed to start the detokenizer from {name_or_path}: the "
            "width of the tokenizer's tokens (setok_config.token_size)"
        )
    return SetokDetokenizer.from_stable_diffusion(name_or_path, **settings)


def train_stage1(config: StageConfig, out: Path) -> Path:
    """Stage 1. Every process calls `save_model` (FSDP and DeepSpeed gather the weights there, and the main process
    writes them); the main process alone writes the rest, and the others wait for it, so the folder is complete
    when the next stage reads it."""
    folder = stage_dir(out, 1)
    args = training_arguments(config, folder)
    tokenizer = text_tokenizer(config, out, args)
    model = pretraining_model(config, tokenizer)
    size = model.config.setok_config.vision_config.image_size
    image_processor = SetokImageProcessor(size={"height": size, "width": size})
    train_dataset = data_files(config)
    if train_dataset is None:
        train_dataset = world_for(config, ("captions",))["captions"]
    collator = SetokPretrainingCollator(
        image_processor, tokenizer, config.data.get("max_phrases", 8), config.data.get("image_folder")
    )
    trainer = Trainer(model=model, args=args, train_dataset=train_dataset, data_collator=collator)
    run_trainer(trainer, config, folder)
    trainer.save_model(str(folder))
    if trainer.is_world_process_zero():
        image_processor.save_pretrained(str(folder))
    trainer.accelerator.wait_for_everyone()
    return folder


def setokim_from_stage1(config: StageConfig, out: Path) -> tuple[SetokimForConditionalGeneration, SetokimProcessor]:
    """A Setokim of the stage-1 tokenizer and detokenizer, a language model built from scratch, a vision head and
    a mask decoder."""
    pretrained = SetokForPreTraining.from_pretrained(stage_dir(out, 1))
    model_config = dict(config.model)
    text_config, name = model_config.pop("text_config", None), model_config.pop("language_model", None)
    set_seed(config.seed)
    if name is not None:  # a pretrained LLM and its own tokenizer (the paper's)
        tokenizer, language_model = AutoTokenizer.from_pretrained(name), AutoModelForCausalLM.from_pretrained(name)
    else:  # one built from `text_config`, on the run's tokenizer
        tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
        language_model = AutoModelForCausalLM.from_config(
            AutoConfig.for_model(
                **text_config,
                vocab_size=len(tokenizer),
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        )
    composed, processor = SetokimForConditionalGeneration.from_parts(
        pretrained.setok, language_model, tokenizer, projector_type=model_config.pop("projector_type", "mlp2x_gelu")
    )
    mask_decoder = model_config.pop("mask_decoder_config", None)
    setokim_config = composed.config
    for name, value in model_config.items():  # the loss weights
        setattr(setokim_config, name, value)
    setokim_config.vision_output_head = True
    setokim_config.detokenizer_config = pretrained.config.detokenizer_config
    if mask_decoder is not None:
        setokim_config.mask_decoder_config = SetokimMaskDecoderConfig(**mask_decoder)
    model = SetokimForConditionalGeneration(setokim_config)
    missing, unexpected = model.load_state_dict(composed.state_dict(), strict=False)
    heads = ("vision_head.", "detokenizer.", "mask_decoder.")
    if unexpected or any(not key.startswith(heads) for key in missing):
        raise RuntimeError(f"composing the stage-2 model lost weights: missing {missing}, unexpected {unexpected}")
    model.detokenizer.load_state_dict(pretrained.detokenizer.state_dict())
    return model, processor


def train_chat_stage(config: StageConfig, out: Path) -> Path:
    """Stages 2 and 3: chat examples of the world's tasks through `SetokimDataCollator` and the `Trainer`. The model
    is saved as in stage 1 (`train_stage1`); stage 3 saves its adapters so, and the main process merges them."""
    if config.stage == 2:
        model, processor = setokim_from_stage1(config, out)
    else:
        previous = stage_dir(out, 2)
        model = SetokimForConditionalGeneration.from_pretrained(previous)
        processor = SetokimProcessor.from_pretrained(previous)
    if config.lora is not None:
        model = get_peft_model(model, language_model_lora_config(**config.lora))
    counts = set_trainable(model, **config.trainable)
    check_adapters_hold_what_trains(model)
    logger.warning(f"Stage {config.stage} trains {counts} parameters per part")
    train_dataset = data_files(config)
    if train_dataset is None:
        tasks = config.data["tasks"]
        train_dataset = chat_examples(world_for(config, tuple(tasks)), tasks)
    processor.tokenizer.padding_side = "right"
    folder = stage_dir(out, config.stage)
    set_seed(config.seed)
    collator = SetokimDataCollator(
        processor,
        max_length=config.data.get("max_length"),
        image_folder=config.data.get("image_folder"),
        mask_size=config.data.get("mask_size"),
    )
    args = training_arguments(config, folder, model)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        data_collator=collator,
        optimizer_cls_and_kwargs=part_learning_rates(args, config.learning_rates) if config.learning_rates else None,
    )
    run_trainer(trainer, config, folder)
    trainer.save_model(str(folder if config.lora is None else folder / ADAPTER_DIR))
    if trainer.is_world_process_zero():
        if config.lora is not None:
            merged_model(stage_dir(out, config.stage - 1), folder / ADAPTER_DIR).save_pretrained(str(folder))
        processor.tokenizer.padding_side = "left"  # what batched generation needs
        processor.save_pretrained(str(folder))
    trainer.accelerator.wait_for_everyone()
    return folder


def check_adapters_hold_what_trains(model: SetokimForConditionalGeneration | PeftModel) -> None:
    """Refuse a LoRA stage that trains weights outside its adapters: it saves only the adapters (with the
    `modules_to_save` copies), so such weights would train and then be lost. A model without adapters saves whole."""
    if not isinstance(model, PeftModel):
        return
    adapter_names = set(model.peft_config)
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    lost = [
        part
        for part, modules in model_parts(model).items()
        for module in modules
        if any(p.requires_grad and adapter_names.isdisjoint(names[id(p)].split(".")) for p in module.parameters())
    ]
    if lost:
        raise ValueError(
            f"trainable parts {sorted(set(lost))} train outside the LoRA adapters, which are all a LoRA stage saves: "
            "add their modules to lora.modules_to_save (`setok` holds the vision encoder and merger) or freeze them"
        )


def merged_model(base: Path, adapter: Path) -> SetokimForConditionalGeneration:
    """The model in `base` with the adapters in `adapter` merged in. Merged from the saved adapters rather than
    the trained model: under FSDP each process holds only a shard of that, and `save_model` gathered it."""
    return PeftModel.from_pretrained(SetokimForConditionalGeneration.from_pretrained(base), adapter).merge_and_unload()


def train_stage(config: StageConfig, out: str | os.PathLike) -> Path:
    """Run one stage into `out` and return the folder of its trained model."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return train_stage1(config, out) if config.stage == 1 else train_chat_stage(config, out)


__all__ = ["RECIPES_DIR", "STAGES", "StageConfig", "stage_config_path", "stage_dir", "train_stage"]
