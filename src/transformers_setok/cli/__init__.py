"""The `setok` command: one sub-command per module.

    setok demo                                     # the shipped tiny Setokim at work: demo/index.html
    setok tokenize photos/ --counts counts.csv     # token counts and region overlays of images
    setok convert --stage1 mm_projector.bin ...    # official SeTok checkpoints to Transformers folders
    setok compose --vision siglip/ --language-model llm/ --output setokim/   # a Setokim from pretrained parts
    setok reconstruct photo.png --model setok-pretraining/ --out recon/   # images redrawn from their tokens
    setok generate "A red circle." --model setokim/ --out gen/   # draw; `setok edit photo.png "..."` edits
    setok segment photo.png "the red circle" --model setokim/ --out seg/   # the referred object's mask
    setok train --all --out runs/tiny              # the three-stage recipe (stock Trainer + peft)
    setok evaluate --model runs/tiny/stage3 --seed 1 --json metrics.json   # every task on a held-out world
    setok --version

Errors a user can fix (a wrong path, a folder of the wrong kind, a bad setting) end the command with one line
saying what to do, never a traceback.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .. import __version__
from . import compose, convert, demo, evaluate, generate, reconstruct, tokenize, train
from .tokenize import demo_tokenizer, sample_image_paths


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="setok", description="SeTok semantic vision tokenizer tools.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (demo, tokenize, convert, compose, reconstruct, generate, train, evaluate):
        command.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `setok` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    return args.handler(args)


__all__ = ["build_parser", "demo_tokenizer", "main", "sample_image_paths"]
