"""`python -m transformers_setok.cli`, the same as the `setok` command."""

import sys

from . import main

sys.exit(main())
