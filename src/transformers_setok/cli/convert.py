"""`setok convert`: official SeTok checkpoints to Transformers folders (see `transformers_setok.conversion`)."""

from __future__ import annotations

import argparse

from ..conversion.convert_setok_official import DESCRIPTION, add_arguments, run


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "convert",
        help="convert an official SeTok or Setokim checkpoint to a Transformers folder",
        description=DESCRIPTION,
    )
    add_arguments(parser)
    parser.set_defaults(handler=lambda args: run(args, parser))
