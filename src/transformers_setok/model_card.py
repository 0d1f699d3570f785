"""The model card (`README.md` in the Hub's format) a saved Setokim folder gets unless it has one."""

from __future__ import annotations

import os
from pathlib import Path

from .configuration_setokim import SetokimConfig

CARD_TEMPLATE = """---
library_name: transformers
pipeline_tag: image-text-to-text
tags:
- setok
- setokim
- transformers-setok
---

# Setokim

A Setokim model (arXiv 2406.05127): SeTok vision tokens between `[Img]` and `[/Img]` inside a
`{text_model_type}` language model.

```python
import transformers_setok  # pip install transformers-setok
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained("{repo}")
processor = AutoProcessor.from_pretrained("{repo}")
```

Without the plugin installed, pass `trust_remote_code=True` to both calls.
"""


def write_model_card(save_directory: str | os.PathLike, config: SetokimConfig) -> None:
    """Write `README.md` into `save_directory`, unless the folder already has one (a card is never overwritten)."""
    path = Path(save_directory) / "README.md"
    if path.exists():
        return
    path.write_text(CARD_TEMPLATE.format(text_model_type=config.text_config.model_type, repo=Path(save_directory).name))
