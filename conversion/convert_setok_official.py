"""Script entry point of `setok convert`: official SeTok checkpoints to Transformers folders.

The code lives in `transformers_setok.conversion.convert_setok_official`; this file re-exports it so
`python conversion/convert_setok_official.py --help` and `from conversion.convert_setok_official import ...` work
from a checkout.
"""

import sys

from transformers_setok.conversion.convert_setok_official import *  # noqa: F403
from transformers_setok.conversion.convert_setok_official import main

if __name__ == "__main__":
    sys.exit(main())
