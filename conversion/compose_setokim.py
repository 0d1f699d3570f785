"""Script entry point of `setok compose`: a Setokim composed from a pretrained vision encoder and causal LM.

The code lives in `transformers_setok.conversion.compose_setokim`; this file re-exports it so
`python conversion/compose_setokim.py --help` and `from conversion.compose_setokim import ...` work from a checkout.
"""

import sys

from transformers_setok.conversion.compose_setokim import *  # noqa: F403
from transformers_setok.conversion.compose_setokim import main

if __name__ == "__main__":
    sys.exit(main())
