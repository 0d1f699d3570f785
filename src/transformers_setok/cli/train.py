"""`setok train`: the three-stage recipe on the stock `Trainer`, one stage or all of them.

    setok train --all --out runs/tiny                       # the tiny recipe on the shapes world, end to end
    setok train --stage 1 --out runs/tiny                   # one stage; it resumes from its newest checkpoint
    setok train --stage 2 --recipe my-recipe/ --out runs/x  # a folder of stage1.yaml, stage2.yaml, stage3.yaml
    torchrun --nproc_per_node 2 -m transformers_setok.cli train --stage 1 --out runs/tiny
    setok train --dry-run --all --recipe paper --accelerate-config zero2 --out runs/paper   # sizes, no training

The final model (stage 3) is `<out>/stage3`: a Setokim checkpoint with its processor, for `from_pretrained`,
`setok evaluate` and `setok demo`.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch
from transformers.utils import logging

from ..recipes.dry_run import dry_run, format_report
from ..recipes.recipe import STAGES, StageConfig, stage_config_path, train_stage
from .errors import failure_for

fail = failure_for("train")
COMMAND_FILE = "command.txt"
logger = logging.get_logger("transformers_setok")


def stage_configs(args: argparse.Namespace) -> list[StageConfig]:
    stages = STAGES if args.all else (args.stage,)
    try:
        return [StageConfig.from_file(stage_config_path(args.recipe, stage)) for stage in stages]
    except (OSError, ValueError, TypeError) as error:
        fail(str(error))


def plan(args: argparse.Namespace) -> int:
    """`--dry-run`: print what each stage would build and train, having downloaded and trained nothing."""
    try:
        plans = dry_run(args.recipe, STAGES if args.all else (args.stage,), args.out, args.accelerate_config)
    except (OSError, ValueError, TypeError) as error:
        fail(str(error))
    print(format_report(plans))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.dry_run:
        return plan(args)
    if args.accelerate_config is not None:
        fail(
            "--accelerate-config is checked by --dry-run; to train with it, launch this command with "
            "`accelerate launch --config_file FILE -m transformers_setok.cli train ...`"
        )
    configs = stage_configs(args)
    logging.set_verbosity_info()
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / COMMAND_FILE, "a") as commands:  # for the model card: how this run was made
        commands.write(" ".join(["setok", *map(shlex.quote, sys.argv[1:])]) + "\n")
    for config in configs:
        started = time.perf_counter()
        folder = train_stage(config, args.out)
        minutes = (time.perf_counter() - started) / 60
        print(f"stage {config.stage}: trained in {minutes:.1f} min -> {folder}")
    if torch.distributed.is_initialized():  # under torchrun: left to exit teardown, gloo's threads can abort it
        torch.distributed.destroy_process_group()
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "train",
        help="train SeTok and Setokim with the three-stage recipe (stock Trainer, peft LoRA in stage 3)",
        description="Stage 1: tokenizer + detokenizer; stage 2: multimodal pretraining; stage 3: instruction "
        "tuning with LoRA. Each stage resumes from its newest checkpoint under <out>/stage<N>/checkpoints.",
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--stage", type=int, choices=STAGES, help="the stage to run")
    which.add_argument("--all", action="store_true", help="run the three stages in order")
    parser.add_argument(
        "--recipe",
        default="tiny",
        help="a shipped recipe ('tiny', 'paper') or a folder of stage<N>.yaml files (default: %(default)s)",
    )
    parser.add_argument("--out", type=Path, required=True, help="run folder: tokenizer/, stage1/, stage2/, stage3/")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="build each stage's models on the meta device and its TrainingArguments, print parameters per part, "
        "batch and steps; download and train nothing",
    )
    parser.add_argument(
        "--accelerate-config",
        help="with --dry-run: an `accelerate launch` config to check against each stage, a file or a shipped one "
        "('fsdp', 'zero2', 'multi_cpu')",
    )
    parser.set_defaults(handler=run)
