"""The model card (`README.md` in the Hub's format) a saved Setokim folder gets unless it has one.

The card's metadata is what the Hub indexes (`library_name`, `pipeline_tag`, `tags`, `base_model`); its text says
what the model is built from, what its image-token budget is, and how to load it with and without this plugin.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .configuration_setokim import SetokimConfig

TAGS = ["setok", "setokim", "transformers-setok", "multimodal", "vision-language", "custom_code"]
PAPER = "https://arxiv.org/abs/2406.05127"

CARD_BODY = """
# {name}

A **Setokim** model: the SeTok vision tokenizer inside a causal language model ([SeTok, ICLR 2025]({paper})).
SeTok clusters an image's patch features into a *variable* number of vision tokens, one per semantic region; the
tokens go through a projector into the language model between `[Img]` and `[/Img]`.

| part | |
| --- | --- |
| vision encoder | `{vision_model_type}`{vision_base}, {image_size}x{image_size} px input, {num_patches} patches |
| clustering | density peaks, `cluster_threshold={cluster_threshold}`, `cluster_k={cluster_k}` |
| vision tokens | {token_size} wide |
| projector | `{projector_type}` |
| language model | `{text_model_type}`{text_base}, {context} |

## Image-token budget

Each image becomes between `min_tokens={min_tokens}` and `max_tokens={max_tokens}` tokens, as many as its content
needs. These are the image's cost in the language model's context; set them per call (`cluster_threshold`,
`min_tokens`, `max_tokens`, `cluster_k` to `forward` / `generate`) or in `config.setok_config`.

## Usage

With the plugin (`pip install transformers-setok`):

```python
import transformers_setok  # registers Setokim with the Auto classes
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained("{repo}")
processor = AutoProcessor.from_pretrained("{repo}")
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What is shown?"}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=[Image.open("photo.jpg")], text=[prompt], return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=64)
print(processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
```

Without the plugin, the folder carries its modeling code: pass `trust_remote_code=True` to both
`from_pretrained` calls (and drop the `import transformers_setok`).

`{repo}` is this folder; use its Hub id once it is pushed.

## Citation

```bibtex
@inproceedings{{wu2025setok,
  title     = {{Towards Semantic Equivalence of Tokenization in Multimodal {{LLM}}}},
  author    = {{Wu, Shengqiong and Fei, Hao and Li, Xiangtai and Ji, Jiayi and Zhang, Hanwang and
               Chua, Tat-Seng and Yan, Shuicheng}},
  booktitle = {{International Conference on Learning Representations (ICLR)}},
  year      = {{2025}},
  url       = {{{paper}}}
}}
```
"""


def hub_id(config: object) -> str | None:
    """The Hub model id a (sub-)config was loaded from, or None for local folders and configs built in code."""
    name = getattr(config, "_name_or_path", "") or ""
    if not name or os.path.isabs(name) or os.path.exists(name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name if "/" in name else None


def model_card(config: SetokimConfig, name: str) -> ModelCard:
    """The card of a Setokim with `config`, saved in a folder called `name`."""
    setok, text = config.setok_config, config.text_config
    vision = setok.vision_config
    bases = {"vision": hub_id(vision), "text": hub_id(text)}
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        tags=TAGS,
        base_model=[base for base in bases.values() if base] or None,
    )
    max_positions = getattr(text, "max_position_embeddings", None)
    body = CARD_BODY.format(
        name=name,
        repo=name,
        paper=PAPER,
        vision_model_type=vision.model_type,
        vision_base=f" ([{bases['vision']}](https://huggingface.co/{bases['vision']}))" if bases["vision"] else "",
        image_size=vision.image_size,
        num_patches=(vision.image_size // vision.patch_size) ** 2,
        cluster_threshold=setok.cluster_threshold,
        cluster_k=setok.cluster_k,
        token_size=setok.token_size,
        projector_type=config.projector_type,
        text_model_type=text.model_type,
        text_base=f" ([{bases['text']}](https://huggingface.co/{bases['text']}))" if bases["text"] else "",
        context=f"{max_positions}-position context" if max_positions else "context as its config says",
        min_tokens=setok.min_tokens,
        max_tokens="None (no bound)" if setok.max_tokens is None else setok.max_tokens,
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def write_model_card(save_directory: str | os.PathLike, config: SetokimConfig) -> None:
    """Write `README.md` into `save_directory`, unless the folder already has one (a card is never overwritten)."""
    path = Path(save_directory) / "README.md"
    if path.exists():
        return
    model_card(config, Path(save_directory).resolve().name).save(path)
