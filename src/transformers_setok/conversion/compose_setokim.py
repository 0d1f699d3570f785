"""Compose a Setokim from pretrained parts and write a folder ready for training.

The parts: a vision encoder (a SigLIP folder such as so400m-patch14-384, whose vision tower is kept, any Hugging
Face vision model, or a converted SeTok folder, merger included) and any causal language model (Vicuna, Llama,
Qwen, ...) with its tokenizer. A fresh token merger is built around a bare vision encoder; `[Img]`, `[/Img]` and
`<image>` are added to the tokenizer, their embedding rows set to the mean of the existing ones; a fresh projector
joins the two. The folder holds the model (sharded safetensors), its config and a `SetokimProcessor`, so
`AutoModelForImageTextToText.from_pretrained(folder)` and `AutoProcessor.from_pretrained(folder)` load it.

With `detokenizer` (a `SetokDetokenizer` folder, a `SetokForPreTraining` folder whose detokenizer is taken, or a
Stable-Diffusion-style folder whose U-Net, VAE and noise schedule are kept), the Setokim also gets a fresh vision
head and that detokenizer, so the one folder understands, draws and edits.

Run `setok compose --help` (or `python conversion/compose_setokim.py --help` from a checkout), or import
`compose_setokim` from `transformers_setok.conversion`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..configuration_setok_detokenizer import SetokDetokenizerConfig
from ..configuration_setok_pretraining import SetokForPreTrainingConfig
from ..modeling_setok_detokenizer import SetokDetokenizer
from ..modeling_setok_pretraining import SetokForPreTraining
from ..modeling_setokim import SetokimForConditionalGeneration
from ..processing_setokim import SetokimProcessor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# command-line flag -> SetokConfig field, for a fresh merger around a bare vision encoder
SETOK_FLAGS = {
    "cluster_threshold": "cluster_threshold",
    "cluster_k": "cluster_k",
    "min_tokens": "min_tokens",
    "max_tokens": "max_tokens",
    "merger_heads": "num_attention_heads",
    "inner_layers": "inner_layers",
    "inter_layers": "inter_layers",
    "merger_intermediate_size": "intermediate_size",
    "token_size": "token_size",
    "vision_feature_layer": "vision_feature_layer",
}


def compose_setokim(
    vision: str | Path | PreTrainedModel,
    language_model: str | Path | PreTrainedModel,
    output: str | Path | None = None,
    *,
    tokenizer: str | Path | PreTrainedTokenizerBase | None = None,
    projector_type: str = "mlp2x_gelu",
    detokenizer: str | Path | None = None,
    dtype: str | torch.dtype = "auto",
    max_shard_size: str | int = "5GB",
    **setok_kwargs: Any,
) -> tuple[SetokimForConditionalGeneration, SetokimProcessor]:
    """A Setokim from a vision encoder and a causal LM, written to `output` when given.

    Args:
        vision: a vision encoder (folder or model; the vision tower of a CLIP/SigLIP dual encoder is taken) or a
            SeTok folder / `SetokModel` (its trained merger is kept).
        language_model: any causal LM (folder or model).
        output: folder to write the model and processor to.
        tokenizer: the language model's tokenizer; its folder by default.
        projector_type: `"linear"` or `"mlp{N}x_gelu"`.
        detokenizer: a detokenizer to compose in (see the module docstring), with a fresh vision head.
        dtype: `auto` (the language model's) or `float32` / `bfloat16` / `float16`.
        max_shard_size: largest safetensors shard.
        setok_kwargs: `SetokConfig` fields of a fresh merger (threshold, budget, sizes); not allowed with a SeTok.
    """
    check_source("detokenizer", detokenizer, "a SeTok detokenizer, SeTok pretraining or Stable Diffusion folder")
    if dtype != "auto" and not isinstance(dtype, torch.dtype) and dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    wanted = DTYPES.get(dtype, dtype) if dtype != "auto" else "auto"
    check_source("vision", vision, "a vision encoder or SeTok folder")
    if not isinstance(vision, PreTrainedModel):
        config_file = Path(vision) / "config.json"
        if config_file.is_file() and json.loads(config_file.read_text()).get("model_type") == "setokim":
            raise ValueError(f"vision: {str(vision)!r} is a whole Setokim; pass a vision encoder or a SeTok folder")
        vision = str(vision)
    check_source("language_model", language_model, "a causal language model folder")
    check_source("tokenizer", tokenizer, "a tokenizer folder")
    if not isinstance(language_model, PreTrainedModel):
        tokenizer = language_model if tokenizer is None else tokenizer
        language_model = AutoModelForCausalLM.from_pretrained(str(language_model), dtype=wanted)
    if tokenizer is None:
        raise ValueError("tokenizer is required when language_model is a model rather than a folder")
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    resolved = language_model.dtype if wanted == "auto" else wanted
    model, processor = SetokimForConditionalGeneration.from_parts(
        vision, language_model, tokenizer=tokenizer, projector_type=projector_type, dtype=resolved, **setok_kwargs
    )
    if detokenizer is not None:
        renderer = load_detokenizer(detokenizer, model.config.setok_config.token_size)
        model.add_image_generation(renderer.to(model.dtype))
    if output is not None:
        model.save_pretrained(output, max_shard_size=max_shard_size)
        processor.save_pretrained(output)
    return model, processor


DESCRIPTION = (
    "Compose a Setokim from a pretrained vision encoder (e.g. SigLIP so400m, or a converted SeTok folder) and any "
    "causal LM (e.g. Vicuna, Llama, Qwen), add [Img], [/Img] and <image> to its tokenizer, and write a folder ready "
    "for training (sharded safetensors, configs, SetokimProcessor)."
)


def load_detokenizer(source: str | Path, token_size: int) -> SetokDetokenizer:
    """A `SetokDetokenizer` from its own folder, a SeTok pretraining folder, or a Stable-Diffusion-style folder."""
    folder = Path(source)
    if (folder / "unet").is_dir():
        return SetokDetokenizer.from_stable_diffusion(folder, token_size=token_size)
    model_type = AutoConfig.from_pretrained(str(folder)).model_type
    if model_type == SetokDetokenizerConfig.model_type:
        return SetokDetokenizer.from_pretrained(str(folder))
    if model_type == SetokForPreTrainingConfig.model_type:
        return SetokForPreTraining.from_pretrained(str(folder)).detokenizer
    raise ValueError(
        f"detokenizer: {str(source)!r} holds a {model_type!r} model; pass a SeTok detokenizer or SeTok pretraining "
        "folder, or a Stable-Diffusion-style folder (unet/, scheduler/, optionally vae/)"
    )


def check_source(argument: str, source: Any, what: str) -> None:
    """A path that is neither a folder here nor a possible Hub id is a `ValueError` naming the argument."""
    if not isinstance(source, (str, os.PathLike)) or Path(source).exists():
        return
    try:
        validate_repo_id(str(source))
    except HFValidationError:
        raise ValueError(f"{argument}: no folder {str(source)!r}; pass {what} (or a Hub model id)") from None


def build_parser(prog: str = "compose_setokim.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The composition's options, on the script's own parser or on the `setok compose` sub-command."""
    parser.add_argument("--vision", required=True, help="vision encoder folder, or a SeTok folder (merger kept)")
    parser.add_argument("--language-model", required=True, help="causal LM folder")
    parser.add_argument("--output", required=True, help="folder to write the composed model to")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the language model folder)")
    parser.add_argument("--projector-type", default="mlp2x_gelu", help="linear or mlp{N}x_gelu (default: mlp2x_gelu)")
    parser.add_argument(
        "--detokenizer",
        help="a detokenizer to compose in (adds a vision head): a SeTok detokenizer or SeTok pretraining folder, "
        "or a Stable-Diffusion-style folder whose U-Net, VAE and noise schedule are kept",
    )
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="default: the language model's")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default: 5GB)")
    merger = parser.add_argument_group("fresh merger (a bare vision encoder only; SetokConfig defaults otherwise)")
    merger.add_argument("--cluster-threshold", type=float, help="density-peak score a centre must exceed")
    merger.add_argument("--cluster-k", type=int, help="neighbours of the density estimate")
    merger.add_argument("--min-tokens", type=int, help="fewest tokens per image")
    merger.add_argument("--max-tokens", type=int, help="most tokens per image")
    merger.add_argument("--merger-heads", type=int, help="attention heads of the merger")
    merger.add_argument("--inner-layers", type=int, help="attention layers inside each cluster")
    merger.add_argument("--inter-layers", type=int, help="attention layers across cluster tokens")
    merger.add_argument("--merger-intermediate-size", type=int, help="hidden width of the merger MLPs")
    merger.add_argument("--token-size", type=int, help="width of the vision tokens")
    merger.add_argument("--vision-feature-layer", type=int, help="hidden state the patch features come from")


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Compose as the parsed options say. 0 on success, 1 (with the reason on stderr) if refused."""
    setok_kwargs = {
        field: getattr(args, flag) for flag, field in SETOK_FLAGS.items() if getattr(args, flag) is not None
    }
    try:
        model, processor = compose_setokim(
            args.vision,
            args.language_model,
            args.output,
            tokenizer=args.tokenizer,
            projector_type=args.projector_type,
            detokenizer=args.detokenizer,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            **setok_kwargs,
        )
    except (OSError, ValueError, NotImplementedError) as error:  # a wrong path included
        print(f"error: {error}", file=sys.stderr)
        return 1
    config = model.config
    print(
        f"wrote Setokim to {args.output}: {type(model.model.setok.vision_model).__name__} vision encoder, "
        f"{type(model.model.language_model).__name__} language model ({model.num_parameters():,} parameters, "
        f"{model.dtype}); [Img] / <image> / [/Img] are ids {config.image_start_token_id} / {config.image_token_id} / "
        f"{config.image_end_token_id} of {len(processor.tokenizer)} tokens"
    )
    return 0
