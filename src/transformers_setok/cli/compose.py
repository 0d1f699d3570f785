"""`setok compose`: a Setokim from a pretrained vision encoder and a causal LM (`transformers_setok.conversion`)."""

from __future__ import annotations

import argparse

from ..conversion.compose_setokim import DESCRIPTION, add_arguments, run


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "compose",
        help="compose a Setokim from a vision encoder and a causal language model",
        description=DESCRIPTION,
    )
    add_arguments(parser)
    parser.set_defaults(handler=run)
