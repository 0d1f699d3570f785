"""Conversion of official SeTok checkpoints, and Setokim composed from pretrained parts.

Installed as `setok convert` and `setok compose`; `conversion/*.py` in a checkout runs the same code as scripts.
"""

from .compose_setokim import compose_setokim
from .convert_setok_official import (
    CheckpointError,
    ConversionError,
    ConversionReport,
    ConversionResult,
    convert_setok,
    convert_setokim,
    read_weight_file,
)

__all__ = [
    "CheckpointError",
    "ConversionError",
    "ConversionReport",
    "ConversionResult",
    "compose_setokim",
    "convert_setok",
    "convert_setokim",
    "read_weight_file",
]
