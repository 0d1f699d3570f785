"""Convert official SeTok checkpoints (github.com/ChocoWu/SeTok) to Transformers folders.

Two kinds of official checkpoint exist:

* the **stage-1** SeTok state dict (`tokenizer.*` and `detokenizer.*`, saved by `train_setok.py` as
  `mm_projector.bin`): converted to a `SetokModel` folder with its image processor;
* the **Setokim** checkpoint, a LLaVA-style Llama folder (`config.json`, tokenizer files, weights with
  `model.vision_tower.*`, `model.mm_in_projector.*`, `model.mm_out_projector.*`, `model.embed_tokens.*`,
  `model.layers.*`, `lm_head.*`, ...): converted to a `SetokimForConditionalGeneration` folder with a
  `SetokimProcessor`. A stage-1 file may be given beside it to supply the vision tokenizer where the
  checkpoint lacks it (as the official training script loads it).

Every source key ends up in exactly one category of the report: mapped, consumed (a copy of a shared tensor,
or a deterministic buffer the model recomputes, checked first), dropped on purpose (the SigLIP text tower; the
contrastive temperature, which `official_pretraining_weights` maps onto `SetokForPreTraining`), not mapped
(the official detokenizer and stage-1 losses, which have no working architecture to map onto; the output
projector and the diffusion head, which have no counterpart yet), or unexpected. Missing, unexpected and
mis-shaped keys are listed by name; the converter refuses to write a partial model unless `allow_partial` is
set, and never writes one whose tensors do not fit (mis-shaped keys, conflicting copies).

Run `setok convert --help` (or `python conversion/convert_setok_official.py --help` from a checkout), or import
`convert_setok` / `convert_setokim` from `transformers_setok.conversion`.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import re
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer, GenerationConfig, LlamaConfig, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from ..configuration_setok import SetokConfig
from ..configuration_setokim import SetokimConfig
from ..image_processing_setok import SetokImageProcessor
from ..modeling_setok import SetokModel
from ..modeling_setokim import SetokimForConditionalGeneration
from ..processing_setokim import IMAGE_END_TOKEN, IMAGE_START_TOKEN, SetokimProcessor

# --------------------------------------------------------------------------------------------------------------
# What the official code calls things
# --------------------------------------------------------------------------------------------------------------

# `VisionTowerArguments` defaults of the official `training_utils.py`: what a stage-1 checkpoint was trained with
# unless its run said otherwise (a stage-1 checkpoint carries no config of its own).
OFFICIAL_TOKENIZER_DEFAULTS: dict[str, Any] = {
    "threshold": 0.55,
    "min_cluster_num": 64,
    "nheads": 2,
    "mm_vision_select_layer": -1,
    "mm_vision_select_feature": "patch",
    "proj_drop": 0.2,
    "attn_drop": 0.0,
}
# The projector of the official fine-tuning script (`scripts/finetune.sh`); used only when neither the weights nor
# the config say which one the checkpoint has.
OFFICIAL_PROJECTOR_DEFAULT = "mlp2x_gelu"
# The official image markers (`src/constants.py`), renamed to this package's markers with the same ids.
OFFICIAL_IMAGE_START, OFFICIAL_IMAGE_END = "<im_start>", "<im_end>"
# Heads of the SigLIP vision towers, by width, for when no vision config is given (not inferable from shapes).
SIGLIP_HEADS_BY_WIDTH = {768: 12, 1024: 16, 1152: 16}

SETOK_PREFIX = "tokenizer."  # stage-1 file: SeTok(...).tokenizer
SETOKIM_SETOK_PREFIX = "model.vision_tower."  # Setokim checkpoint: SetokimLlamaModel.vision_tower
VISION_TOWER = "image_feature_encoder.vision_tower."  # inside the tokenizer: a full SigLIP dual encoder

# Source keys that no part of this package takes yet; reported as "not mapped" (a partial conversion).
NOT_MAPPED_RULES = [
    (
        re.compile(r"^(detokenizer|model\.vision_generator)\."),
        "official detokenizer (a Q-Former + ViT decoder whose forward returns nothing): no working architecture to "
        "map onto; SetokDetokenizer is the paper's token-conditioned U-Net, trained anew",
    ),
    (
        re.compile(r"^(rec_loss\.|contrastive_loss\.(?!logit_scale$))"),
        "official stage-1 losses (a reconstruction discriminator; a contrastive loss that calls a string as its text "
        "encoder): no working architecture to map onto",
    ),
    (
        re.compile(r"^model\.mm_out_projector\."),
        "output projector (LLM states -> vision tokens, for image generation): no counterpart yet",
    ),
    (re.compile(r"^model\.diffloss\."), "diffusion head regressing generated vision tokens: no counterpart yet"),
]
# Source keys left out on purpose; reported as "dropped", which does not make a conversion partial.
DROPPED_RULES = [
    (
        re.compile(r"(^|\.)image_feature_encoder\.vision_tower\.(text_model\..*|logit_scale|logit_bias)$"),
        "SigLIP text tower and contrastive logit scale/bias: SeTok keeps only the vision tower",
    ),
    (
        re.compile(r"^contrastive_loss\.logit_scale$"),
        "contrastive temperature: not part of a SetokModel; `official_pretraining_weights` maps it onto "
        "SetokForPreTraining's concept_head.logit_scale",
    ),
]
# Official stage-1 keys that map onto `SetokForPreTraining` (outside the tokenizer), with their target shapes.
PRETRAINING_KEYS = {"contrastive_loss.logit_scale": ("concept_head.logit_scale", (1,))}
# Setok key renames, relative to the tokenizer prefix on both sides (the shared LayerNorm is handled apart).
SETOK_RENAMES = [
    (
        re.compile(r"^(inner|inter)_encoder\.layers\.(\d+)\.1\.(qkv|proj)\.(weight|bias)$"),
        r"merger.\1_encoder.layers.\2.attention.\3.\4",
    ),
    (re.compile(r"^(inner|inter)_encoder\.norm2\.(weight|bias)$"), r"merger.\1_encoder.mlp_norm.\2"),
    (re.compile(r"^(inner|inter)_encoder\.mlp\.(fc1|fc2)\.(weight|bias)$"), r"merger.\1_encoder.mlp.\2.\3"),
    (re.compile(r"^out\.(weight|bias)$"), r"merger.out.\1"),
    (re.compile(r"^" + re.escape(VISION_TOWER) + r"vision_model\.(.+)$"), r"vision_model.\1"),
]
# Language-model and input-projector renames of the Setokim checkpoint (the embeddings are handled apart).
SETOKIM_RENAMES = [
    (re.compile(r"^model\.layers\.(.+)$"), r"model.language_model.layers.\1"),
    (re.compile(r"^model\.norm\.weight$"), "model.language_model.norm.weight"),
    (re.compile(r"^model\.mm_in_projector\.(weight|bias)$"), r"model.multi_modal_projector.0.\1"),
    (re.compile(r"^model\.mm_in_projector\.(\d+)\.(weight|bias)$"), r"model.multi_modal_projector.\1.\2"),
]
ROTARY_BUFFER = re.compile(r"rotary_emb\.inv_freq$")
# Official config fields that describe the multimodal wrapper rather than the language model.
MULTIMODAL_CONFIG_KEY = re.compile(
    r"^(mm_|vision_|use_mm_|tune_mm|freeze_mm|image_|tokenizer_|diff|mask_ratio|target_token|token_feat_dim$)"
)
CONFIG_BOOKKEEPING_KEYS = {"model_type", "architectures", "auto_map", "_name_or_path", "transformers_version"}
CONFIG_DTYPE_KEYS = {"torch_dtype", "dtype"}

WEIGHT_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "mm_projector.bin")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(ValueError):
    """An official checkpoint that cannot be read safely, or is not a flat state dict of tensors."""


class ConversionError(ValueError):
    """A conversion that would give a wrong or (without `allow_partial`) partial model; `report` says why."""

    def __init__(self, message: str, report: ConversionReport | None = None) -> None:
        super().__init__(message if report is None else f"{message}\n\n{report.format()}")
        self.report = report


# --------------------------------------------------------------------------------------------------------------
# Reading checkpoints
# --------------------------------------------------------------------------------------------------------------


def read_weight_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat `{name: tensor}` dict from one `.safetensors` or pickled (`.bin`, `.pt`, `.pth`) file.

    Pickles are read with `weights_only=True`: one holding anything but tensors and plain containers (a class
    instance, a function) is refused, since unpickling it could run code. A readable pickle must still be a flat
    mapping of names to tensors; anything else is refused with the offending key named.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        what = f" (it contains {found.group(1)})" if found else ""
        raise CheckpointError(
            f"refusing to load {str(path)!r}: the pickle holds objects other than tensors{what}, and unpickling "
            "them could run arbitrary code. Re-save the weights as a plain state dict of tensors, or as safetensors."
        ) from None
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{str(path)!r} holds a {type(state).__name__}, expected a state dict (name -> tensor)")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{str(path)!r} is not a flat state dict of tensors: key {key!r} holds a {type(value).__name__}"
            )
    return dict(state)


def weight_files_in(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder: a sharded index's shards, or the single weight file."""
    for index_name in WEIGHT_INDEX_FILES:
        index = folder / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [folder / shard for shard in shards]
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return [folder / name]
    raise CheckpointError(
        f"no weights found in {str(folder)!r}: expected one of {', '.join(WEIGHT_INDEX_FILES + WEIGHT_FILES)}"
    )


def load_official_state_dict(path: str | Path, progress: bool = True) -> dict[str, torch.Tensor]:
    """All tensors of an official checkpoint: a weight file, or a folder with one weight file or shards."""
    path = Path(path)
    files = weight_files_in(path) if path.is_dir() else [path]
    state: dict[str, torch.Tensor] = {}
    for file in tqdm(files, desc="reading shards", unit="file", disable=not progress or len(files) == 1):
        part = read_weight_file(file)
        repeated = sorted(state.keys() & part.keys())
        if repeated:
            raise CheckpointError(f"{str(file)!r} repeats keys of another shard: {repeated[:5]}")
        state.update(part)
    return state


def official_pretraining_weights(stage1: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The `SetokForPreTraining` weights an official stage-1 state dict holds besides its tokenizer.

    Only the contrastive temperature (`contrastive_loss.logit_scale`, a log inverse temperature as in CLIP) has
    a counterpart; load the result with `model.load_state_dict(weights, strict=False)`.
    """
    return {
        target: stage1[source].reshape(shape).clone()
        for source, (target, shape) in PRETRAINING_KEYS.items()
        if source in stage1
    }


def read_official_config(path: str | Path) -> dict[str, Any]:
    """The official `config.json` next to (or in) `path` as a dict; empty when there is none."""
    path = Path(path)
    config_file = (path if path.is_dir() else path.parent) / "config.json"
    return json.loads(config_file.read_text()) if config_file.is_file() else {}


# --------------------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------------------


def compact_keys(keys: Iterable[str]) -> list[str]:
    """Keys grouped by their pattern with the layer indices folded: `a.{0-3}.b (4 keys)`. Every key is covered."""
    groups: dict[tuple[str, ...], list[tuple[int, ...]]] = {}
    for key in keys:
        parts = key.split(".")
        pattern = tuple("#" if part.isdigit() else part for part in parts)
        groups.setdefault(pattern, []).append(tuple(int(part) for part in parts if part.isdigit()))
    lines = []
    for pattern, indices in sorted(groups.items()):
        positions = iter(zip(*indices)) if indices[0] else iter(())
        parts = [format_indices(sorted(set(next(positions)))) if part == "#" else part for part in pattern]
        suffix = f" ({len(indices)} keys)" if len(indices) > 1 else ""
        lines.append(".".join(parts) + suffix)
    return lines


def keys_count(count: int) -> str:
    return f"{count} key" if count == 1 else f"{count} keys"


def format_indices(values: list[int]) -> str:
    if len(values) == 1:
        return str(values[0])
    if values == list(range(values[0], values[-1] + 1)):
        return f"{{{values[0]}-{values[-1]}}}"
    return "{" + ",".join(map(str, values)) + "}"


@dataclass
class ConversionReport:
    """Where every source key went, and what the converted model lacks.

    Attributes:
        mapped: target key -> the source key it was copied from.
        consumed: source key -> why it needs no target (a copy of a shared tensor, a buffer the model recomputes).
        dropped: source key -> why it was left out on purpose (not a partial conversion).
        not_mapped: source key -> why no part of this package takes it yet (a partial conversion).
        unexpected: source keys no rule knows.
        missing: target keys no source key filled (initialised fresh when `allow_partial`).
        mismatched: target key -> (source key, source shape, expected shape).
        conflicts: copies that should be equal but are not, buffers that do not match the model.
        notes: settings and decisions worth knowing (clustering, image tokens, select feature).
    """

    mapped: dict[str, str] = field(default_factory=dict)
    consumed: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    not_mapped: dict[str, str] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    mismatched: dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    conflicts: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def is_complete(self) -> bool:
        """Every source tensor is accounted for and every model tensor is filled."""
        return not (self.not_mapped or self.unexpected or self.missing or self.mismatched or self.conflicts)

    @property
    def fits(self) -> bool:
        """No tensor contradicts the model: nothing mis-shaped, no conflicting copies."""
        return not (self.mismatched or self.conflicts)

    def format(self) -> str:
        lines = [f"mapped: {len(self.mapped)} model tensors from {len(set(self.mapped.values()))} source tensors"]

        def by_reason(title: str, entries: dict[str, str]) -> None:
            if not entries:
                return
            lines.append(f"{title} ({keys_count(len(entries))}):")
            for reason, count in Counter(entries.values()).items():
                lines.append(f"  {reason} ({keys_count(count)}):")
                lines.extend(f"    {key}" for key in compact_keys(k for k, r in entries.items() if r == reason))

        def listing(title: str, keys: Iterable[str]) -> None:
            keys = list(keys)
            if keys:
                lines.append(f"{title} ({keys_count(len(keys))}):")
                lines.extend(f"  {key}" for key in compact_keys(keys))

        by_reason("consumed (checked copies and recomputed buffers)", self.consumed)
        by_reason("dropped on purpose", self.dropped)
        by_reason("NOT MAPPED (no counterpart yet)", self.not_mapped)
        listing("UNEXPECTED (no rule knows these source keys)", self.unexpected)
        listing("MISSING (no source key fills these model keys)", self.missing)
        if self.mismatched:
            lines.append(f"MIS-SHAPED ({keys_count(len(self.mismatched))}):")
            for target, (source, shape, expected) in sorted(self.mismatched.items()):
                lines.append(f"  {source} {list(shape)} -> {target} expects {list(expected)}")
        if self.conflicts:
            lines.append(f"CONFLICTS ({len(self.conflicts)}):")
            lines.extend(f"  {conflict}" for conflict in self.conflicts)
        if self.notes:
            lines.append("notes:")
            lines.extend(f"  - {note}" for note in self.notes)
        return "\n".join(lines)


@dataclass
class ConversionResult:
    """The converted model, its processor (a `SetokImageProcessor` for SeTok), the report and the output folder."""

    model: SetokModel | SetokimForConditionalGeneration
    processor: SetokimProcessor | SetokImageProcessor
    report: ConversionReport
    output: Path | None = None


# --------------------------------------------------------------------------------------------------------------
# Settings and configs
# --------------------------------------------------------------------------------------------------------------


def resolve_tokenizer_settings(official: Mapping[str, Any] | None, **overrides: Any) -> dict[str, Any]:
    """Official tokenizer settings: explicit overrides, then the checkpoint's `vision_tower_config`, then defaults."""
    settings = dict(OFFICIAL_TOKENIZER_DEFAULTS)
    settings.update({key: value for key, value in (official or {}).items() if value is not None})
    settings.update({key: value for key, value in overrides.items() if value is not None})
    return settings


def load_vision_config(path: str | Path) -> Any:
    """A vision config from a folder or `config.json`; the vision tower's when it is a dual encoder's."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"vision_config: {str(path)!r} does not exist")
    data = json.loads((path / "config.json" if path.is_dir() else path).read_text())
    config = AutoConfig.for_model(**data)
    return getattr(config, "vision_config", None) or config


def infer_vision_config(vision_state: Mapping[str, torch.Tensor]) -> Any:
    """A SigLIP vision config read off the weights' shapes (keys relative to `vision_model.`).

    Only the head count is not in the shapes: it is taken from the SigLIP family by width, and a width outside it
    needs an explicit vision config.
    """
    patch = vision_state["embeddings.patch_embedding.weight"]
    positions = vision_state["embeddings.position_embedding.weight"]
    width, channels, patch_size = patch.shape[0], patch.shape[1], patch.shape[-1]
    if width not in SIGLIP_HEADS_BY_WIDTH:
        raise ValueError(
            f"the vision tower is {width} wide, which is no SigLIP width this converter knows the head count of "
            f"({sorted(SIGLIP_HEADS_BY_WIDTH)}); pass its config with vision_config (--vision-config PATH)"
        )
    layers = {int(match.group(1)) for key in vision_state if (match := re.match(r"encoder\.layers\.(\d+)\.", key))}
    return AutoConfig.for_model(
        "siglip_vision_model",
        hidden_size=width,
        intermediate_size=vision_state["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=len(layers),
        num_attention_heads=SIGLIP_HEADS_BY_WIDTH[width],
        num_channels=channels,
        image_size=math.isqrt(positions.shape[0]) * patch_size,
        patch_size=patch_size,
        vision_use_head="head.probe" in vision_state,
    )


def resolve_vision_config(
    source: Mapping[str, torch.Tensor],
    setok_prefix: str,
    vision_config: str | Path | None,
    official_settings: Mapping[str, Any],
    report: ConversionReport,
) -> Any:
    """The vision config: given, else the official vision tower path when it is a local folder, else inferred."""
    if vision_config is not None:
        return load_vision_config(vision_config)
    tower = official_settings.get("vision_tower")
    if tower and (Path(tower) / "config.json").is_file():
        report.notes.append(f"vision config read from the official vision_tower folder {tower!r}")
        return load_vision_config(tower)
    prefix = f"{setok_prefix}{VISION_TOWER}vision_model."
    vision_state = {key[len(prefix) :]: value for key, value in source.items() if key.startswith(prefix)}
    if "embeddings.patch_embedding.weight" not in vision_state:
        raise ValueError(
            f"the checkpoint holds no vision tower ({prefix}*) to read its config from; pass vision_config "
            "(--vision-config PATH, a SigLIP folder or config.json)"
        )
    config = infer_vision_config(vision_state)
    report.notes.append(
        f"vision config inferred from the weights: SigLIP, {config.hidden_size} wide, {config.num_hidden_layers} "
        f"layers, {config.num_attention_heads} heads, {config.image_size}px images in {config.patch_size}px patches"
    )
    return config


def count_layers(source: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"layers\.(\d+)\.1\.qkv\.weight$")
    indices = {int(match.group(1)) for key in source if (match := pattern.match(key))}
    return max(indices) + 1 if indices else 0


def setok_config_from_official(
    source: Mapping[str, torch.Tensor],
    prefix: str,
    settings: Mapping[str, Any],
    vision_config: Any,
    min_tokens: int | None,
    report: ConversionReport,
) -> SetokConfig:
    """Our `SetokConfig` for an official tokenizer: sizes from the weights, clustering from the official settings.

    The official code uses `min_cluster_num` twice: as the `k` of the density estimate and as the number of
    centres taken when no patch passes the threshold. Here `cluster_k = min_cluster_num` and `min_tokens` (a floor
    on the count, by default `min_cluster_num`) reproduce the official count whenever no patch passes the threshold
    or at least `min_tokens` do; `min_tokens=1` reproduces it whenever at least one does.
    """

    def rows(key: str, fallback: Any) -> int:
        tensor = source.get(prefix + key)
        return int(tensor.shape[0]) if tensor is not None else int(fallback)

    min_cluster_num = int(settings["min_cluster_num"])
    floor = min_cluster_num if min_tokens is None else int(min_tokens)
    select = settings["mm_vision_select_feature"]
    config = SetokConfig(
        vision_config=vision_config,
        vision_feature_layer=int(settings["mm_vision_select_layer"]),
        vision_feature_select_strategy="full",
        cluster_k=min_cluster_num,
        cluster_threshold=float(settings["threshold"]),
        min_tokens=floor,
        max_tokens=None,
        hidden_size=vision_config.hidden_size,
        num_attention_heads=int(settings["nheads"]),
        inner_layers=count_layers(source, prefix + "inner_encoder.") or int(settings.get("inner_cluster_layers", 2)),
        inter_layers=count_layers(source, prefix + "inter_encoder.") or int(settings.get("intra_cluster_layers", 2)),
        intermediate_size=rows("inner_encoder.mlp.fc1.weight", settings.get("dim_feedforward", 4096)),
        token_size=rows("out.weight", settings.get("token_feat_dim", 4096)),
        hidden_act="gelu",
        dropout=float(settings["proj_drop"]),
        attention_dropout=float(settings["attn_drop"]),
        layer_norm_eps=1e-5,
    )
    agreement = f"whenever at least {floor} patches pass" + (" or none does" if floor == min_cluster_num else "")
    if floor != min_cluster_num:
        agreement += f"; when none does, the official code takes {min_cluster_num} and this model {floor}"
    report.notes.append(
        f"clustering: threshold {config.cluster_threshold}; the official min_cluster_num ({min_cluster_num}) is both "
        f"the density k (cluster_k={config.cluster_k}) and the count taken when no patch passes the threshold; "
        f"min_tokens={floor} is a floor, so token counts agree with the official code {agreement}"
    )
    report.notes.append(
        f"merger dropout {config.dropout}, attention dropout {config.attention_dropout} (the official proj_drop and "
        "attn_drop; they act in training only)"
    )
    report.notes.append(
        f"patch features: hidden state {config.vision_feature_layer} of the vision tower, every patch kept"
        + (
            " (the official 'patch' setting drops the first token, a CLS token SigLIP does not have: the published "
            "code cannot reshape the remaining patches to a square grid)"
            if select == "patch"
            else ""
        )
    )
    return config


def text_config_from_official(official: Mapping[str, Any], vocab_size: int, pad_token_id: int | None) -> LlamaConfig:
    """The language model's config: the official LlamaConfig fields, without the multimodal wrapper's."""
    fields = {
        key: value
        for key, value in official.items()
        if key not in CONFIG_BOOKKEEPING_KEYS | CONFIG_DTYPE_KEYS and not MULTIMODAL_CONFIG_KEY.match(key)
    }
    fields.update(vocab_size=vocab_size, pad_token_id=pad_token_id)
    return LlamaConfig(**fields)


def projector_type_of(
    source: Mapping[str, torch.Tensor], official: Mapping[str, Any], report: ConversionReport
) -> str:
    """`linear` or `mlp{N}x_gelu`, read off the projector's weights, checked against the official config."""
    prefix = "model.mm_in_projector."
    keys = [key[len(prefix) :] for key in source if key.startswith(prefix)]
    configured = official.get("mm_in_projector_type") or (official.get("vision_in_projector_config") or {}).get(
        "mm_in_projector_type"
    )
    if not keys:
        found = configured or OFFICIAL_PROJECTOR_DEFAULT
    elif "weight" in keys:
        found = "linear"
    else:
        indices = sorted({int(key.split(".")[0]) for key in keys})
        if any(source[f"{prefix}{index}.weight"].dim() == 1 for index in indices):
            raise ConversionError(
                "the input projector has a LayerNorm (an official '_Norm' projector), which SetokimProjector does not "
                "have; only 'linear' and 'mlp{N}x_gelu' projectors convert"
            )
        found = f"mlp{len(indices)}x_gelu"
    if found != "linear" and not re.fullmatch(r"mlp\d+x_gelu", found):
        raise ConversionError(
            f"the checkpoint's input projector is {found!r}; SetokimProjector has only 'linear' and 'mlp{{N}}x_gelu'"
        )
    if configured and configured != found:
        report.conflicts.append(f"config.json says mm_in_projector_type={configured!r} but the weights hold {found!r}")
    if not keys and configured is None:
        report.notes.append(f"no projector weights: projector_type {found!r} assumed")
    return found


# --------------------------------------------------------------------------------------------------------------
# Key mapping
# --------------------------------------------------------------------------------------------------------------


class KeyMapper:
    """Moves source tensors to target names, recording every decision in a `ConversionReport`."""

    def __init__(self, source: Mapping[str, torch.Tensor], progress: bool = True) -> None:
        self.source = source
        self.remaining = set(source)
        self.target: dict[str, torch.Tensor] = {}
        self.report = ConversionReport()
        self.progress = progress

    def put(self, target: str, source_key: str, tensor: torch.Tensor | None = None) -> None:
        self.target[target] = self.source[source_key] if tensor is None else tensor
        self.report.mapped[target] = source_key
        self.remaining.discard(source_key)

    def consume(self, source_key: str, reason: str) -> None:
        self.report.consumed[source_key] = reason
        self.remaining.discard(source_key)

    def map_shared_norm(self, copies: list[str], targets: list[str]) -> None:
        """One LayerNorm the official Block shares across its attention layers: one copy per layer here.

        `copies` are the names the shared module has in the state dict (`norm1` and `layers.{i}.0`; a deduplicating
        save may keep only some). All present copies must be equal.
        """
        for name in ("weight", "bias"):
            present = [f"{copy}.{name}" for copy in copies if f"{copy}.{name}" in self.source]
            if not present:
                continue
            kept = self.source[present[0]]
            for other in present[1:]:
                tensor = self.source[other]
                if tensor.shape != kept.shape or not torch.equal(tensor, kept):
                    self.report.conflicts.append(
                        f"{other} differs from {present[0]}: the official merger block shares one pre-attention "
                        "LayerNorm across its layers, so both must be the same tensor"
                    )
                self.consume(other, "another name of the shared pre-attention LayerNorm (checked equal)")
            for target in targets:
                self.put(f"{target}.{name}", present[0], kept.clone())

    def map_setok(self, src: str, dst: str, config: SetokConfig) -> None:
        """The vision tokenizer under `src` (official names) to `dst` (a `SetokModel`'s names)."""
        for block, depth in (("inner_encoder", config.inner_layers), ("inter_encoder", config.inter_layers)):
            copies = [f"{src}{block}.norm1"] + [f"{src}{block}.layers.{index}.0" for index in range(depth)]
            targets = [f"{dst}merger.{block}.layers.{index}.norm" for index in range(depth)]
            self.map_shared_norm(copies, targets)

        inv_freq_key = f"{src}position_embedding.inv_freq"
        if inv_freq_key in self.source:
            channels = 2 * math.ceil(config.hidden_size / 4)
            expected = 1.0 / (10000 ** (torch.arange(0, channels, 2, dtype=torch.float32) / channels))
            found = self.source[inv_freq_key].float()
            if found.shape != expected.shape or not torch.allclose(found, expected, rtol=1e-5, atol=0):
                self.report.conflicts.append(
                    f"{inv_freq_key} ({found.numel()} frequencies) is not the position code of "
                    f"{config.hidden_size}-wide patch features ({expected.numel()}): the official merger width must "
                    "equal the vision tower's, as its forward adds the code to the features unprojected"
                )
            self.consume(inv_freq_key, "2-D sin-cos position code frequencies: recomputed by the model (checked)")
        cache_key = f"{src}position_embedding.cached_penc"
        if cache_key in self.source:
            self.consume(cache_key, "position code cache: recomputed by the model")
        position_ids = f"{src}{VISION_TOWER}vision_model.embeddings.position_ids"
        if position_ids in self.source:
            ids = self.source[position_ids]
            if not torch.equal(ids.flatten().long(), torch.arange(ids.numel())):
                self.report.conflicts.append(f"{position_ids} is not 0..{ids.numel() - 1}")
            self.consume(position_ids, "SigLIP position ids: recomputed by the model (checked)")

        keys = sorted(key for key in self.remaining if key.startswith(src))
        for key in tqdm(keys, desc="mapping vision tokenizer", unit="key", disable=not self.progress):
            relative = key[len(src) :]
            for pattern, replacement in SETOK_RENAMES:
                if pattern.match(relative):
                    self.put(dst + pattern.sub(replacement, relative), key)
                    break

    def map_language_model(self, tie_word_embeddings: bool) -> None:
        """The Llama body, its LM head and the input projector of a Setokim checkpoint."""
        keys = sorted(key for key in self.remaining if not key.startswith(SETOKIM_SETOK_PREFIX))
        for key in tqdm(keys, desc="mapping language model", unit="key", disable=not self.progress):
            if ROTARY_BUFFER.search(key):
                self.consume(key, "rotary frequencies: recomputed by the model")
                continue
            for pattern, replacement in SETOKIM_RENAMES:
                if pattern.match(key):
                    self.put(pattern.sub(replacement, key), key)
                    break
        if tie_word_embeddings and "lm_head.weight" in self.source and "model.embed_tokens.weight" in self.source:
            if not torch.equal(self.source["lm_head.weight"], self.source["model.embed_tokens.weight"]):
                self.report.conflicts.append("lm_head.weight differs from the model.embed_tokens.weight tied to it")
            self.consume("lm_head.weight", "tied to model.embed_tokens.weight")

    def map_embeddings(self, vocab_size: int, tie_word_embeddings: bool) -> None:
        """Token embeddings and LM head, grown to `vocab_size` rows set to the mean of the official rows."""
        pairs = [("model.embed_tokens.weight", "model.language_model.embed_tokens.weight")]
        if not tie_word_embeddings:
            pairs.append(("lm_head.weight", "lm_head.weight"))
        for source_key, target in pairs:
            if source_key not in self.source:
                continue
            weight = self.source[source_key]
            extra = vocab_size - weight.shape[0]
            if extra > 0:
                mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
                weight = torch.cat([weight, mean.expand(extra, -1)])
            self.put(target, source_key, weight)

    def classify_leftovers(self) -> None:
        """Sort the source keys no mapping took into not mapped, dropped and unexpected."""
        for key in sorted(self.remaining):
            for rules, category in ((NOT_MAPPED_RULES, self.report.not_mapped), (DROPPED_RULES, self.report.dropped)):
                reason = next((reason for pattern, reason in rules if pattern.search(key)), None)
                if reason is not None:
                    category[key] = reason
                    break
            else:
                self.report.unexpected.append(key)
        self.remaining.clear()

    def check_against(self, expected: Mapping[str, torch.Size], skip: Iterable[str] = ()) -> None:
        """Missing, unexpected (no such model key) and mis-shaped targets, against the model's own shapes."""
        skip = set(skip)
        for target in sorted(self.target):
            if target not in expected:
                self.report.unexpected.append(self.report.mapped.pop(target))
                del self.target[target]
            elif self.target[target].shape != expected[target]:
                shape = tuple(self.target[target].shape)
                self.report.mismatched[target] = (self.report.mapped[target], shape, tuple(expected[target]))
        self.report.unexpected = sorted(set(self.report.unexpected))
        self.report.missing = sorted(set(expected) - set(self.target) - skip)


def expected_shapes(model_class: type, config: Any) -> tuple[dict[str, torch.Size], set[str]]:
    """Parameter and buffer shapes of the model (built on the meta device, so free), and its tied keys."""
    with torch.device("meta"):
        model = model_class(config)
    tied = (
        set(getattr(model, "_tied_weights_keys", None) or {})
        if getattr(config, "tie_word_embeddings", False)
        else set()
    )
    return {key: value.shape for key, value in model.state_dict().items()}, tied


# --------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------


def rename_tokens(tokenizer: PreTrainedTokenizerBase, renames: Mapping[str, str]) -> PreTrainedTokenizerBase:
    """The tokenizer with tokens renamed in place: each new name keeps the old token's id (and so its embedding).

    The tokenizer is saved, every occurrence of an old token as a JSON string or key is replaced in its files,
    and it is loaded back; the ids are then checked.
    """
    vocab = tokenizer.get_vocab()
    renames = {old: new for old, new in renames.items() if old in vocab}
    if not renames:
        return tokenizer
    ids = {new: vocab[old] for old, new in renames.items()}

    def replace(value: Any) -> Any:
        if isinstance(value, str):
            return renames.get(value, value)
        if isinstance(value, list):
            return [replace(item) for item in value]
        if isinstance(value, dict):
            return {renames.get(key, key): replace(item) for key, item in value.items()}
        return value

    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        for file in Path(folder).glob("*.json"):
            file.write_text(json.dumps(replace(json.loads(file.read_text())), ensure_ascii=False))
        renamed = AutoTokenizer.from_pretrained(folder)
    renamed.padding_side = tokenizer.padding_side
    found = {new: renamed.convert_tokens_to_ids(new) for new in ids}
    if found != ids or any(old in renamed.get_vocab() for old in renames):
        raise ConversionError(f"renaming {renames} in the tokenizer did not keep the ids {ids} (got {found})")
    return renamed


# --------------------------------------------------------------------------------------------------------------
# Building and writing
# --------------------------------------------------------------------------------------------------------------


def resolve_dtype(dtype: str | torch.dtype, tensors: Iterable[torch.Tensor]) -> torch.dtype:
    """`auto`: the floating dtype holding most of the converted weights."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype]
    sizes: Counter[torch.dtype] = Counter()
    for tensor in tensors:
        if tensor.is_floating_point():
            sizes[tensor.dtype] += tensor.numel()
    return sizes.most_common(1)[0][0] if sizes else torch.float32


def build_model(
    model_class: type,
    config: Any,
    mapper: KeyMapper,
    allow_partial: bool,
    dtype: str | torch.dtype,
) -> Any:
    """Refuse a wrong or (unless allowed) partial conversion; else load the converted tensors into the model."""
    report = mapper.report
    if not report.fits:
        raise ConversionError("the official tensors do not fit the converted model; nothing was written", report)
    if not report.is_complete and not allow_partial:
        raise ConversionError(
            "the conversion is partial (keys not mapped, unexpected or missing); nothing was written. Pass "
            "allow_partial=True (--allow-partial) to write it anyway: missing weights are then initialised fresh",
            report,
        )
    dtype = resolve_dtype(dtype, mapper.target.values())
    set_config_dtype(config, dtype)
    model = model_class.from_pretrained(None, config=config, state_dict=mapper.target, dtype=dtype)
    return model.eval()


def set_config_dtype(config: Any, dtype: torch.dtype) -> None:
    """Record `dtype` in a config and all its sub-configs, so `from_pretrained` loads every part in it."""
    config.dtype = dtype
    for name in getattr(config, "sub_configs", {}):
        if getattr(config, name, None) is not None:
            set_config_dtype(getattr(config, name), dtype)


def save(result: ConversionResult, output: str | Path, max_shard_size: str | int) -> Path:
    output = Path(output)
    result.model.save_pretrained(output, max_shard_size=max_shard_size)
    result.processor.save_pretrained(output)
    result.output = output
    return output


# --------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------


def convert_setok(
    stage1: str | Path | Mapping[str, torch.Tensor],
    output: str | Path | None = None,
    *,
    vision_config: str | Path | None = None,
    threshold: float | None = None,
    min_cluster_num: int | None = None,
    min_tokens: int | None = None,
    num_heads: int | None = None,
    vision_feature_layer: int | None = None,
    allow_partial: bool = False,
    dtype: str | torch.dtype = "auto",
    max_shard_size: str | int = "5GB",
    progress: bool = True,
) -> ConversionResult:
    """Convert an official stage-1 SeTok state dict (`tokenizer.*`, `detokenizer.*`) to a `SetokModel`.

    Args:
        stage1: the state dict, or the file / folder holding it (`.bin` read with `weights_only=True`, or safetensors).
        output: folder to write the model and its image processor to (sharded safetensors); nothing written if None.
        vision_config: SigLIP folder or `config.json`; inferred from the weights (SigLIP family widths) when None.
        threshold, min_cluster_num, num_heads, vision_feature_layer: the official `threshold`, `min_cluster_num`,
            `nheads` and `mm_vision_select_layer` the checkpoint was trained with (a stage-1 file does not record
            them; the official defaults 0.55, 64, 2 and -1 apply when None).
        min_tokens: floor on the token count; `min_cluster_num` when None (see `setok_config_from_official`).
        allow_partial: write even if keys are not mapped (the official detokenizer and losses), unexpected
            or missing. Mis-shaped or conflicting tensors are never written.
        dtype: `auto` (the checkpoint's) or `float32` / `bfloat16` / `float16`.
        max_shard_size: largest safetensors shard.
        progress: show progress bars.
    """
    source = dict(stage1) if isinstance(stage1, Mapping) else load_official_state_dict(stage1, progress)
    mapper = KeyMapper(source, progress)
    settings = resolve_tokenizer_settings(
        None, threshold=threshold, min_cluster_num=min_cluster_num, nheads=num_heads,
        mm_vision_select_layer=vision_feature_layer,
    )  # fmt: skip
    vision = resolve_vision_config(source, SETOK_PREFIX, vision_config, settings, mapper.report)
    config = setok_config_from_official(source, SETOK_PREFIX, settings, vision, min_tokens, mapper.report)
    mapper.map_setok(SETOK_PREFIX, "", config)
    mapper.classify_leftovers()
    shapes, tied = expected_shapes(SetokModel, config)
    mapper.check_against(shapes, tied)
    model = build_model(SetokModel, config, mapper, allow_partial, dtype)
    result = ConversionResult(model, SetokImageProcessor.for_encoder(config.vision_config), mapper.report)
    if output is not None:
        save(result, output, max_shard_size)
    return result


def convert_setokim(
    checkpoint: str | Path,
    output: str | Path | None = None,
    *,
    stage1: str | Path | Mapping[str, torch.Tensor] | None = None,
    tokenizer: str | Path | PreTrainedTokenizerBase | None = None,
    vision_config: str | Path | None = None,
    threshold: float | None = None,
    min_cluster_num: int | None = None,
    min_tokens: int | None = None,
    num_heads: int | None = None,
    vision_feature_layer: int | None = None,
    allow_partial: bool = False,
    dtype: str | torch.dtype = "auto",
    max_shard_size: str | int = "5GB",
    progress: bool = True,
) -> ConversionResult:
    """Convert an official Setokim (LLaVA-style Llama) checkpoint to a `SetokimForConditionalGeneration`.

    Args:
        checkpoint: the checkpoint folder (`config.json`, tokenizer files, `pytorch_model*.bin` or
            `model*.safetensors`, sharded or not), or one weight file with `config.json` beside it.
        output: folder to write the model and its `SetokimProcessor` to; nothing written if None.
        stage1: a stage-1 SeTok file whose `tokenizer.*` weights fill the vision tokenizer where the checkpoint
            has no `model.vision_tower.*` counterpart (the official training loads it the same way).
        tokenizer: the checkpoint's tokenizer (folder or object); the checkpoint folder by default. Its
            `<im_start>` / `<im_end>` become `[Img]` / `[/Img]` with the same ids, and `<image>` is added.
        Other arguments: as in `convert_setok`; clustering settings default to the checkpoint's
            `vision_tower_config`, then to the official defaults.
    """
    checkpoint = Path(checkpoint)
    official = read_official_config(checkpoint)
    if not official:
        raise ConversionError(
            f"no config.json in or beside {str(checkpoint)!r}: the official config describes the language model"
        )
    source = load_official_state_dict(checkpoint, progress)
    report_notes: list[str] = []
    if stage1 is not None:
        stage1_state = dict(stage1) if isinstance(stage1, Mapping) else load_official_state_dict(stage1, progress)
        added = 0
        for key, value in stage1_state.items():
            name = SETOKIM_SETOK_PREFIX + key[len(SETOK_PREFIX) :] if key.startswith(SETOK_PREFIX) else key
            if name not in source:
                source[name] = value
                added += name.startswith(SETOKIM_SETOK_PREFIX)
        report_notes.append(f"{added} vision tokenizer tensors from the stage-1 file (the checkpoint lacked them)")
    mapper = KeyMapper(source, progress)
    mapper.report.notes.extend(report_notes)

    # the tokenizer: official image markers renamed to ours, same ids; then the processor adds `<image>`
    if tokenizer is None:
        tokenizer = checkpoint if checkpoint.is_dir() else checkpoint.parent
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()  # the official config's model_type is unknown to Transformers
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        finally:
            transformers_logging.set_verbosity(verbosity)
    if official.get("mm_use_im_start_end") and OFFICIAL_IMAGE_START not in tokenizer.get_vocab():
        raise ConversionError(
            f"the checkpoint was trained with {OFFICIAL_IMAGE_START} / {OFFICIAL_IMAGE_END} (mm_use_im_start_end) but "
            "the tokenizer has neither: pass the tokenizer saved with the checkpoint (--tokenizer)"
        )
    official_size = len(tokenizer)
    had_markers = OFFICIAL_IMAGE_START in tokenizer.get_vocab()
    tokenizer = rename_tokens(
        tokenizer, {OFFICIAL_IMAGE_START: IMAGE_START_TOKEN, OFFICIAL_IMAGE_END: IMAGE_END_TOKEN}
    )

    # configs
    settings = resolve_tokenizer_settings(
        official.get("vision_tower_config"), threshold=threshold, min_cluster_num=min_cluster_num, nheads=num_heads,
        mm_vision_select_layer=vision_feature_layer,
    )  # fmt: skip
    vision = resolve_vision_config(source, SETOKIM_SETOK_PREFIX, vision_config, settings, mapper.report)
    setok_config = setok_config_from_official(
        source, SETOKIM_SETOK_PREFIX, settings, vision, min_tokens, mapper.report
    )
    processor = SetokimProcessor(SetokImageProcessor.for_encoder(vision), tokenizer)
    embeddings = source.get("model.embed_tokens.weight")
    rows = int(embeddings.shape[0]) if embeddings is not None else int(official.get("vocab_size", official_size))
    if official_size > rows:
        raise ConversionError(
            f"the tokenizer has {official_size} tokens but the checkpoint's embeddings only {rows} rows: pass the "
            "tokenizer saved with the checkpoint (--tokenizer)"
        )
    vocab_size = max(rows, len(processor.tokenizer))
    candidates = (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id)
    pad_token_id = next((token for token in candidates if token is not None), None)
    text_config = text_config_from_official(official, vocab_size, pad_token_id)
    tie = bool(getattr(text_config, "tie_word_embeddings", False))
    config = SetokimConfig(
        setok_config=setok_config,
        text_config=text_config,
        projector_type=projector_type_of(source, official, mapper.report),
        image_token_id=processor.image_token_id,
        image_start_token_id=processor.image_start_token_id,
        image_end_token_id=processor.image_end_token_id,
        tie_word_embeddings=tie,
    )
    if had_markers:
        mapper.report.notes.append(
            f"image markers: {OFFICIAL_IMAGE_START} / {OFFICIAL_IMAGE_END} renamed {IMAGE_START_TOKEN} / "
            f"{IMAGE_END_TOKEN}, keeping ids {config.image_start_token_id} / {config.image_end_token_id} and their "
            "trained embedding and LM-head rows"
        )
    else:
        mapper.report.notes.append(
            f"image markers: the checkpoint has none (mm_use_im_start_end off); {IMAGE_START_TOKEN} / "
            f"{IMAGE_END_TOKEN} are new tokens the model was never trained with"
        )
    placeholder = (
        f"image placeholder: <image> (id {config.image_token_id}) stands where the official code put "
        "IMAGE_TOKEN_INDEX (-200); the model replaces it with the image's tokens"
    )
    if vocab_size > rows:
        new_rows = f"row {rows} is" if vocab_size == rows + 1 else f"rows {rows}..{vocab_size - 1} are"
        placeholder += f"; embedding and LM-head {new_rows} new, set to the official rows' mean"
    mapper.report.notes.append(placeholder)

    # weights
    mapper.map_setok(SETOKIM_SETOK_PREFIX, "model.setok.", setok_config)
    mapper.map_language_model(tie)
    mapper.map_embeddings(vocab_size, tie)
    mapper.classify_leftovers()
    shapes, tied = expected_shapes(SetokimForConditionalGeneration, config)
    mapper.check_against(shapes, tied)
    model = build_model(SetokimForConditionalGeneration, config, mapper, allow_partial, dtype)

    generation_folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    if (generation_folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(generation_folder)
    model.generation_config.pad_token_id = pad_token_id
    result = ConversionResult(model, processor, mapper.report)
    if output is not None:
        save(result, output, max_shard_size)
    return result


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------


DESCRIPTION = (
    "Convert official SeTok checkpoints (github.com/ChocoWu/SeTok) to Transformers folders. With --checkpoint: a "
    "Setokim folder (model + SetokimProcessor). With --stage1 alone: a SeTok vision tokenizer folder. Every key not "
    "mapped is listed; a partial model is written only with --allow-partial."
)


def build_parser(prog: str = "convert_setok_official.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The conversion's options, on the script's own parser or on the `setok convert` sub-command."""
    parser.add_argument("--checkpoint", help="official Setokim checkpoint folder (config.json, tokenizer, weights)")
    parser.add_argument(
        "--stage1",
        help="official stage-1 SeTok file (tokenizer.*, detokenizer.*); alone: converted to a SeTok folder; with "
        "--checkpoint: fills the vision tokenizer where the checkpoint lacks it",
    )
    parser.add_argument("--output", required=True, help="folder to write the converted model to")
    parser.add_argument("--tokenizer", help="tokenizer folder of the checkpoint (default: the checkpoint folder)")
    parser.add_argument(
        "--vision-config",
        help="SigLIP folder or config.json of the vision tower (default: the checkpoint's vision_tower path if it is "
        "a local folder, else inferred from the weights)",
    )
    parser.add_argument("--threshold", type=float, help="official clustering threshold (default: config, then 0.55)")
    parser.add_argument(
        "--min-cluster-num",
        type=int,
        help="official min_cluster_num: density k and fallback count (default: config, then 64)",
    )
    parser.add_argument(
        "--min-tokens",
        type=int,
        help="floor on tokens per image (default: min_cluster_num; 1 matches the official count whenever any patch "
        "passes the threshold)",
    )
    parser.add_argument("--merger-heads", type=int, help="official nheads of the merger (default: config, then 2)")
    parser.add_argument(
        "--vision-feature-layer",
        type=int,
        help="official mm_vision_select_layer: hidden state the patch features come from (default: config, then -1)",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *DTYPES],
        help="dtype of the written weights (default: auto, the checkpoint's)",
    )
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default: 5GB)")
    parser.add_argument(
        "--allow-partial",
        action="store_true",
        help="write even when keys are not mapped, unexpected or missing (missing weights are initialised fresh)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    return run(parser.parse_args(argv), parser)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Convert as the parsed options say; print the report. 0 on success, 1 (with the reason on stderr) if refused."""
    if args.checkpoint is None and args.stage1 is None:
        parser.error("give --checkpoint (a Setokim checkpoint) or --stage1 (a SeTok stage-1 file), or both")
    common = dict(
        vision_config=args.vision_config,
        threshold=args.threshold,
        min_cluster_num=args.min_cluster_num,
        min_tokens=args.min_tokens,
        num_heads=args.merger_heads,
        vision_feature_layer=args.vision_feature_layer,
        allow_partial=args.allow_partial,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        progress=not args.no_progress,
    )
    try:
        if args.checkpoint is not None:
            result = convert_setokim(
                args.checkpoint, args.output, stage1=args.stage1, tokenizer=args.tokenizer, **common
            )
        else:
            if args.tokenizer is not None:
                parser.error("--tokenizer belongs to a Setokim conversion (--checkpoint)")
            result = convert_setok(args.stage1, args.output, **common)
    except (OSError, ValueError) as error:  # CheckpointError, ConversionError and wrong paths included
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(result.report.format())
    kind = type(result.model).__name__
    state = "complete" if result.report.is_complete else "PARTIAL (--allow-partial)"
    print(f"wrote {kind} to {result.output} ({state})")
    return 0
