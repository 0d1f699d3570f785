"""How every `setok` command fails: one line saying what went wrong and what to do, never a traceback."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NoReturn


def fail(command: str, message: str) -> NoReturn:
    """End `setok <command>` with `message` on one line (its whitespace folded) and exit status 1."""
    raise SystemExit(f"setok {command}: error: {' '.join(message.split())}")


def failure_for(command: str) -> Callable[[str], NoReturn]:
    """`fail` bound to one command, for the modules that report under one name."""
    return partial(fail, command)
