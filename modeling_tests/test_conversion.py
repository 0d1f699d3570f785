"""Conversion of official SeTok checkpoints, and Setokim composed from pretrained parts.

The official layout is built here from tiny random tensors, and the official computation is written out below as a
reference: density-peak clustering as the official code does it (its `delta` included), a merger that runs each
cluster alone through blocks sharing one pre-attention LayerNorm across their attention layers, and a LLaVA-style
forward that splices the projected tokens into the text embeddings where the official `-200` index stands.
"""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SAMPLE_TEXTS, randomize_weights, tiny_setok_config
from PIL import Image
from torch.nn import functional as F
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipConfig,
    SiglipModel,
)

from transformers_setok import SetokimForConditionalGeneration, SetokModel, density_peak_clustering
from transformers_setok.tokenizer_training import train_sentencepiece_tokenizer

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
convert = importlib.import_module("conversion.convert_setok_official")
compose = importlib.import_module("conversion.compose_setokim")

VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=8
)
GRID, WIDTH, TOKEN_SIZE, FFN, HEADS, DEPTH = (8, 8), 32, 24, 48, 2, 2
LLM_WIDTH = 32
TOWER = "image_feature_encoder.vision_tower."


# ------------------------------------------------------------------------------------------------------------------
# The official computation, as a reference
# ------------------------------------------------------------------------------------------------------------------


def official_position_code(height: int, width: int, merger_width: int, feature_width: int) -> torch.Tensor:
    """The official 2-D code: built for the merger width, sliced to the feature width; rows first, sin/cos paired."""
    channels = int(np.ceil(merger_width / 4) * 2)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, channels, 2).float() / channels))

    def sincos(length: int) -> torch.Tensor:
        angles = torch.arange(length).float()[:, None] * inv_freq[None]
        return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(1)

    code = torch.zeros(height, width, 2 * channels)
    code[:, :, :channels] = sincos(height)[:, None]
    code[:, :, channels:] = sincos(width)[None]
    return code[..., :feature_width].reshape(height * width, feature_width)


def official_clusters(x: torch.Tensor, k: int, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Official DPC-KNN on one image (without its 1e-6 noise): `delta` falls back to row maxima, `k` is reused."""
    distances = torch.cdist(x, x) / x.shape[1] ** 0.5
    density = torch.exp(-(distances.topk(k, largest=False).values ** 2).mean(dim=-1))
    denser = density[None, :] > density[:, None]
    farthest = distances.max(dim=-1).values
    delta = torch.where(denser, distances, farthest[None, :]).min(dim=-1).values
    scores = delta * density
    centers = torch.nonzero(scores > threshold).flatten()
    if centers.numel() == 0:
        centers = scores.topk(k).indices.sort().values
    labels = distances[centers].argmin(dim=0)
    labels[centers] = torch.arange(len(centers))
    return centers, labels


def official_block(x: torch.Tensor, state: dict, prefix: str) -> torch.Tensor:
    """An official merger block on `(1, n, width)`: attention layers sharing one LayerNorm, then one MLP."""

    def norm(hidden: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(hidden, (hidden.shape[-1],), state[f"{name}.weight"], state[f"{name}.bias"])

    shared = f"{prefix}norm1" if f"{prefix}norm1.weight" in state else f"{prefix}layers.0.0"
    batch, length, width = x.shape
    depth = sum(key.startswith(f"{prefix}layers.") and key.endswith(".1.qkv.weight") for key in state)
    for index in range(depth):
        layer = f"{prefix}layers.{index}.1."
        qkv = F.linear(norm(x, shared), state[layer + "qkv.weight"], state[layer + "qkv.bias"])
        query, key, value = qkv.reshape(batch, length, 3, HEADS, width // HEADS).permute(2, 0, 3, 1, 4)
        attention = (query @ key.transpose(-2, -1) * (width // HEADS) ** -0.5).softmax(dim=-1)
        mixed = (attention @ value).transpose(1, 2).reshape(batch, length, width)
        x = x + F.linear(mixed, state[layer + "proj.weight"], state[layer + "proj.bias"])
    hidden = F.linear(norm(x, f"{prefix}norm2"), state[f"{prefix}mlp.fc1.weight"], state[f"{prefix}mlp.fc1.bias"])
    return x + F.linear(F.gelu(hidden), state[f"{prefix}mlp.fc2.weight"], state[f"{prefix}mlp.fc2.bias"])


def official_tokens(
    state: dict, prefix: str, features: torch.Tensor, k: int, threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens of one image's patch features `(n, width)`: each cluster through the inner block alone, mean-pooled."""
    merger_width = state[f"{prefix}inner_encoder.norm2.weight"].numel()
    x = features + official_position_code(*GRID, merger_width, features.shape[1])
    centers, labels = official_clusters(x, k, threshold)
    pooled = [
        official_block(x[labels == cluster][None], state, f"{prefix}inner_encoder.")[0].mean(dim=0)
        for cluster in range(len(centers))
    ]
    tokens = official_block(torch.stack(pooled)[None], state, f"{prefix}inter_encoder.")[0]
    return F.linear(tokens, state[f"{prefix}out.weight"], state[f"{prefix}out.bias"]), centers, labels


def official_projector(state: dict, tokens: torch.Tensor) -> torch.Tensor:
    """The official `mlp2x_gelu` input projector: Sequential(Linear, GELU, Linear)."""
    hidden = F.linear(tokens, state["model.mm_in_projector.0.weight"], state["model.mm_in_projector.0.bias"])
    return F.linear(F.gelu(hidden), state["model.mm_in_projector.2.weight"], state["model.mm_in_projector.2.bias"])


# ------------------------------------------------------------------------------------------------------------------
# Official-layout checkpoints from tiny random parts
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SigLIP dual encoder (vision and text towers), as the official code loads with `AutoModel`."""
    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
    model = SiglipModel(SiglipConfig(vision_config=VISION, text_config={**text, "bos_token_id": 2, "eos_token_id": 3}))
    folder = tmp_path_factory.mktemp("siglip")
    model.save_pretrained(folder)
    return folder


def official_tokenizer_state(prefix: str, siglip_dir: Path, seed: int = 0, norm_copies: str = "all") -> dict:
    """An official `SetokTokenizer` state dict under `prefix`.

    `norm_copies` says under which names the shared LayerNorm appears: `all` (as `state_dict()` writes it: `norm1`
    and every `layers.{i}.0`), `norm1` or `layers` (as a deduplicating save may keep it).
    """
    generator = torch.Generator().manual_seed(seed)

    def random(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * scale

    state = {}
    for block in ("inner_encoder", "inter_encoder"):
        weight, bias = 1 + random(WIDTH), random(WIDTH)
        names = {"all": ["norm1", *(f"layers.{i}.0" for i in range(DEPTH))], "norm1": ["norm1"]}
        for name in names.get(norm_copies, [f"layers.{i}.0" for i in range(DEPTH)]):
            state[f"{prefix}{block}.{name}.weight"], state[f"{prefix}{block}.{name}.bias"] = (
                weight.clone(),
                bias.clone(),
            )
        for index in range(DEPTH):
            layer = f"{prefix}{block}.layers.{index}.1."
            state[layer + "qkv.weight"], state[layer + "qkv.bias"] = random(3 * WIDTH, WIDTH), random(3 * WIDTH)
            state[layer + "proj.weight"], state[layer + "proj.bias"] = random(WIDTH, WIDTH), random(WIDTH)
        state[f"{prefix}{block}.norm2.weight"], state[f"{prefix}{block}.norm2.bias"] = 1 + random(WIDTH), random(WIDTH)
        state[f"{prefix}{block}.mlp.fc1.weight"], state[f"{prefix}{block}.mlp.fc1.bias"] = (
            random(FFN, WIDTH),
            random(FFN),
        )
        state[f"{prefix}{block}.mlp.fc2.weight"], state[f"{prefix}{block}.mlp.fc2.bias"] = (
            random(WIDTH, FFN),
            random(WIDTH),
        )
    state[f"{prefix}out.weight"], state[f"{prefix}out.bias"] = random(TOKEN_SIZE, WIDTH), random(TOKEN_SIZE)
    channels = 2 * math.ceil(WIDTH / 4)
    state[f"{prefix}position_embedding.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, channels, 2).float() / channels))
    siglip = SiglipModel.from_pretrained(siglip_dir)
    state.update({f"{prefix}{TOWER}{key}": value.clone() for key, value in siglip.state_dict().items()})
    return state


def stage1_state(siglip_dir: Path, norm_copies: str = "all") -> dict:
    """What the official stage-1 training saves: the tokenizer, the detokenizer and nothing else."""
    state = official_tokenizer_state("tokenizer.", siglip_dir, norm_copies=norm_copies)
    state["detokenizer.mask_tokens"] = torch.randn(1, 64, 16)
    state["detokenizer.mapper_fc_in.weight"] = torch.randn(16, TOKEN_SIZE)
    state["detokenizer.pixel_decoder.0.attn.qkv.weight"] = torch.randn(48, 16)
    state["detokenizer.pixel_decoder.1.attn.qkv.weight"] = torch.randn(48, 16)
    return state


def structured_features(seed: int = 0) -> torch.Tensor:
    """Patch features of an 8x8 image made of four regions, so the density peaks are clear."""
    generator = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(4, WIDTH, generator=generator) * 2
    rows, cols = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    region = ((rows >= 4).long() * 2 + (cols >= 4).long()).flatten()
    return prototypes[region] + torch.randn(64, WIDTH, generator=generator) * 0.3


def threshold_passing(features: torch.Tensor, k: int, count: int) -> float:
    """A threshold exactly `count` patches pass (midway between two density-peak scores)."""
    code = official_position_code(*GRID, WIDTH, WIDTH)
    scores = density_peak_clustering((features + code)[None], k=k, threshold=0.0).scores[0].sort(descending=True)
    return float(scores.values[count - 1] + scores.values[count]) / 2


# ------------------------------------------------------------------------------------------------------------------
# Stage 1: the vision tokenizer
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_copies", ["all", "norm1", "layers"])
def test_stage1_tokens_equal_official_reference(siglip_dir: Path, tmp_path: Path, norm_copies: str) -> None:
    state = stage1_state(siglip_dir, norm_copies)
    # the three ways a stage-1 checkpoint reaches the converter: a torch pickle, safetensors, a state dict
    if norm_copies == "all":
        torch.save(state, tmp_path / "mm_projector.bin")
        stage1 = tmp_path / "mm_projector.bin"
    elif norm_copies == "norm1":
        from safetensors.torch import save_file

        save_file(state, tmp_path / "setok.safetensors")
        stage1 = tmp_path / "setok.safetensors"
    else:
        stage1 = state
    features = structured_features()
    k, threshold = 3, threshold_passing(features, k=3, count=5)
    result = convert.convert_setok(
        stage1,
        tmp_path / "out",
        vision_config=siglip_dir,
        threshold=threshold,
        min_cluster_num=k,
        num_heads=HEADS,
        vision_feature_layer=-2,
        allow_partial=True,  # the detokenizer has no counterpart yet
        progress=False,
    )
    report = result.report
    assert not (report.missing or report.unexpected or report.mismatched or report.conflicts)
    assert set(report.not_mapped) == {key for key in state if key.startswith("detokenizer.")}
    assert set(report.dropped) == {key for key in state if f"{TOWER}text_model." in key or "logit_" in key}
    config = result.model.config
    assert (config.cluster_k, config.min_tokens, config.cluster_threshold) == (k, k, threshold)
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-2, "full")
    assert (config.inner_layers, config.inter_layers, config.token_size, config.intermediate_size) == (2, 2, 24, 48)

    model = SetokModel.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        ours = model.tokenize_features(features[None], GRID)
        reference, centers, labels = official_tokens(state, "tokenizer.", features, k, threshold)
    assert int(ours.num_tokens[0]) == 5
    assert torch.equal(ours.centers[0], centers) and torch.equal(ours.assignment[0], labels)
    torch.testing.assert_close(ours.tokens[0], reference, atol=1e-5, rtol=0)

    # the vision tower is SigLIP's, text tower left out
    siglip = SiglipModel.from_pretrained(siglip_dir)
    for key, value in siglip.vision_model.state_dict().items():
        assert torch.equal(model.vision_model.state_dict()[key], value), key


def test_min_cluster_num_is_k_and_fallback_and_min_tokens_a_floor(siglip_dir: Path) -> None:
    """Official count: the passing patches, or `min_cluster_num` when none pass; `min_tokens` is a floor here."""
    state = stage1_state(siglip_dir)
    result = convert.convert_setok(
        state, vision_config=siglip_dir, min_cluster_num=5, num_heads=HEADS, allow_partial=True, progress=False
    )
    features = structured_features(seed=1)
    model = result.model
    with torch.no_grad():
        for passing in (4, 7):  # fewer than min_cluster_num pass, then more
            threshold = threshold_passing(features, k=5, count=passing)
            _, centers, _ = official_tokens(state, "tokenizer.", features, 5, threshold)
            default = model.tokenize_features(features[None], GRID, cluster_threshold=threshold)
            floor_one = model.tokenize_features(features[None], GRID, cluster_threshold=threshold, min_tokens=1)
            assert len(centers) == passing == int(floor_one.num_tokens[0])
            assert int(default.num_tokens[0]) == max(passing, 5)
        _, centers, _ = official_tokens(state, "tokenizer.", features, 5, threshold=100.0)  # nothing passes
        assert (
            len(centers)
            == 5
            == int(model.tokenize_features(features[None], GRID, cluster_threshold=100.0).num_tokens[0])
        )


# ------------------------------------------------------------------------------------------------------------------
# Setokim: the LLaVA-style checkpoint
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def official_setokim(siglip_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """An official Setokim checkpoint folder: config.json, the tokenizer with its added tokens, pytorch_model.bin."""
    folder = tmp_path_factory.mktemp("official_setokim")
    tokenizer = train_sentencepiece_tokenizer(SAMPLE_TEXTS, folder, vocab_size=400)
    # what the official training adds with mm_use_im_start_end (src/model/setokim_arch.py)
    tokenizer.add_tokens(["<im_start>", "<im_end>", "<target>"], special_tokens=True)
    tokenizer.pad_token = tokenizer.unk_token  # the official "v1" conversation setting
    tokenizer.save_pretrained(folder)
    llm_config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=LLM_WIDTH, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(1)
    llm = randomize_weights(LlamaForCausalLM(llm_config), seed=1)  # trained-looking norms, as in a real checkpoint
    state = {key: value.clone() for key, value in llm.state_dict().items()}
    state.update(official_tokenizer_state("model.vision_tower.", siglip_dir, seed=2))
    generator = torch.Generator().manual_seed(3)
    state["model.mm_in_projector.0.weight"] = torch.randn(LLM_WIDTH, TOKEN_SIZE, generator=generator) * 0.2
    state["model.mm_in_projector.0.bias"] = torch.randn(LLM_WIDTH, generator=generator) * 0.2
    state["model.mm_in_projector.2.weight"] = torch.randn(LLM_WIDTH, LLM_WIDTH, generator=generator) * 0.2
    state["model.mm_in_projector.2.bias"] = torch.randn(LLM_WIDTH, generator=generator) * 0.2
    torch.save(state, folder / "pytorch_model.bin")
    config = {
        **llm_config.to_dict(),
        "model_type": "setokim_llama",
        "architectures": ["SetokimLlamaForCausalLM"],
        "mm_vision_tower": str(siglip_dir),
        "vision_tower_config": {
            "vision_tower": str(siglip_dir), "hidden_dim": WIDTH, "token_feat_dim": TOKEN_SIZE, "min_cluster_num": 3,
            "threshold": 0.5, "nheads": HEADS, "dim_feedforward": FFN, "proj_drop": 0.2, "attn_drop": 0.0,
            "inner_cluster_layers": DEPTH, "intra_cluster_layers": DEPTH, "mm_vision_select_layer": -2,
            "mm_vision_select_feature": "cls_patch",
        },
        "token_feat_dim": TOKEN_SIZE,
        "use_mm_in_proj": True,
        "mm_in_projector_type": "mlp2x_gelu",
        "vision_in_projector_config": {"mm_in_projector_type": "mlp2x_gelu", "mm_hidden_size": TOKEN_SIZE},
        "mm_use_im_start_end": True,
        "mm_use_im_patch_token": False,
        "image_start_index": "<im_start>",
        "tokenizer_padding_side": "right",
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    return folder, state


def sample_image() -> Image.Image:
    return Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))


def test_setokim_logits_equal_llava_style_reference(official_setokim: tuple[Path, dict], tmp_path: Path) -> None:
    folder, state = official_setokim
    result = convert.convert_setokim(folder, tmp_path / "out", max_shard_size="200KB", progress=False)
    assert result.report.is_complete, result.report.format()
    assert len(list((tmp_path / "out").glob("model-*-of-*.safetensors"))) > 1  # sharded
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "out").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "out")
    assert isinstance(model, SetokimForConditionalGeneration)
    official_tokenizer = AutoTokenizer.from_pretrained(folder)
    official_vocab = len(official_tokenizer)

    # [Img] / [/Img] are the official <im_start> / <im_end>: same ids, same text around them
    start, end = official_tokenizer.convert_tokens_to_ids(["<im_start>", "<im_end>"])
    assert (processor.image_start_token_id, processor.image_end_token_id) == (start, end)
    assert processor.image_token_id == official_vocab == model.config.text_config.vocab_size - 1
    assert (
        processor.tokenizer("USER: [Img][/Img]\nWhat is shown?").input_ids
        == official_tokenizer("USER: <im_start><im_end>\nWhat is shown?").input_ids
    )
    for new, official in (
        (model.get_input_embeddings(), "model.embed_tokens.weight"),
        (model.lm_head, "lm_head.weight"),
    ):
        torch.testing.assert_close(new.weight[:official_vocab], state[official], atol=0, rtol=0)
        torch.testing.assert_close(new.weight[official_vocab], state[official].mean(dim=0))  # the <image> row
    config = model.config.setok_config
    assert (config.cluster_k, config.min_tokens, config.cluster_threshold, config.vision_feature_layer) == (
        3,
        3,
        0.5,
        -2,
    )

    inputs = processor(text="USER: <image>\nWhat is shown? ASSISTANT:", images=sample_image(), return_tensors="pt")
    with torch.no_grad():
        features = model.model.setok.get_patch_features(inputs.pixel_values)[0][0]
        # a threshold five patches pass, where the official clustering and ours agree
        threshold = threshold_passing(features, k=3, count=5)
        model.model.setok.config.cluster_threshold = threshold
        ours = model(**inputs).logits

        siglip = SiglipModel.from_pretrained(siglip_dir_of(folder))
        official_features = siglip.vision_model(inputs.pixel_values, output_hidden_states=True).hidden_states[-2][0]
        torch.testing.assert_close(official_features, features, atol=1e-6, rtol=0)
        tokens, centers, _ = official_tokens(state, "model.vision_tower.", official_features, 3, threshold)
        assert len(centers) == 5
        # the official model is a LlamaForCausalLM plus the multimodal parts: its Llama keys load as they are
        official_config = json.loads((folder / "config.json").read_text())
        llama_fields = LlamaConfig().to_dict().keys() - {"model_type", "architectures"}
        llm = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in official_config.items() if k in llama_fields}))
        llama_keys = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")
        llm.load_state_dict({key: value for key, value in state.items() if key.startswith(llama_keys)})
        ids = inputs.input_ids[0]
        at = int((ids == processor.image_token_id).nonzero())
        embed = llm.get_input_embeddings()
        spliced = torch.cat([embed(ids[:at]), official_projector(state, tokens), embed(ids[at + 1 :])])
        reference = llm(inputs_embeds=spliced[None]).logits
    assert ours.shape[:2] == reference.shape[:2] == (1, len(ids) - 1 + 5)
    torch.testing.assert_close(ours[..., :official_vocab], reference, atol=1e-5, rtol=0)

    # generation runs on the converted folder
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(out[:, : inputs.input_ids.shape[1]], inputs.input_ids) and out.shape[1] == len(ids) + 3


def siglip_dir_of(official_folder: Path) -> str:
    return json.loads((official_folder / "config.json").read_text())["vision_tower_config"]["vision_tower"]


def test_setokim_unmapped_parts_refused_unless_allowed_and_stage1_fills_the_tokenizer(
    official_setokim: tuple[Path, dict], tmp_path: Path
) -> None:
    """A full official checkpoint (generation path included, as safetensors) whose vision tokenizer is in stage 1."""
    from safetensors.torch import save_file

    folder, state = official_setokim
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (checkpoint / name).write_bytes((folder / name).read_bytes())
    generation = {
        "model.vision_generator.mask_tokens": torch.randn(1, 64, 16),
        "model.mm_out_projector.0.weight": torch.randn(WIDTH, LLM_WIDTH),
        "model.diffloss.net.input_proj.weight": torch.randn(8, TOKEN_SIZE),
    }
    kept = {key: value for key, value in state.items() if not key.startswith("model.vision_tower.")}
    save_file({**kept, **generation}, checkpoint / "model.safetensors")
    stage1 = {
        "tokenizer." + key[len("model.vision_tower.") :]: value
        for key, value in state.items()
        if key.startswith("model.vision_tower.")
    }
    stage1["detokenizer.mapper_fc_in.weight"] = torch.randn(16, TOKEN_SIZE)

    with pytest.raises(convert.ConversionError) as error:
        convert.convert_setokim(checkpoint, tmp_path / "out", stage1=stage1, progress=False)
    message = str(error.value)
    assert "partial" in message and "--allow-partial" in message
    for key in [*generation, "detokenizer.mapper_fc_in.weight"]:
        assert key in message
    assert not (tmp_path / "out").exists()

    result = convert.convert_setokim(checkpoint, stage1=stage1, allow_partial=True, progress=False)
    assert set(result.report.not_mapped) == {*generation, "detokenizer.mapper_fc_in.weight"}
    assert not (result.report.missing or result.report.unexpected)
    setok = result.model.model.setok
    assert torch.equal(setok.merger.out.weight, state["model.vision_tower.out.weight"])
    for index in range(DEPTH):
        norm = setok.merger.inner_encoder.layers[index].norm.weight
        assert torch.equal(norm, state["model.vision_tower.inner_encoder.norm1.weight"])


# ------------------------------------------------------------------------------------------------------------------
# What goes wrong is named
# ------------------------------------------------------------------------------------------------------------------


def test_missing_unexpected_and_misshaped_keys_are_named(siglip_dir: Path) -> None:
    state = stage1_state(siglip_dir)
    del state["tokenizer.out.bias"]
    state["tokenizer.extra_head.weight"] = torch.zeros(3)
    state["tokenizer.inter_encoder.layers.1.1.proj.weight"] = torch.zeros(WIDTH, WIDTH + 1)
    options = dict(vision_config=siglip_dir, num_heads=HEADS, progress=False)
    with pytest.raises(convert.ConversionError) as error:
        convert.convert_setok(state, allow_partial=True, **options)  # a mis-shaped tensor is never written
    message = str(error.value)
    assert "MIS-SHAPED" in message
    assert (
        "tokenizer.inter_encoder.layers.1.1.proj.weight [32, 33] -> merger.inter_encoder.layers.1.attention.proj"
        in message
    )
    assert "merger.out.bias" in message and "tokenizer.extra_head.weight" in message

    state["tokenizer.inter_encoder.layers.1.1.proj.weight"] = torch.zeros(WIDTH, WIDTH)
    with pytest.raises(convert.ConversionError, match="partial"):
        convert.convert_setok(state, **options)
    report = convert.convert_setok(state, allow_partial=True, **options).report
    assert report.missing == ["merger.out.bias"] and report.unexpected == ["tokenizer.extra_head.weight"]
    assert not report.mismatched and not report.is_complete


def test_conflicting_copies_of_the_shared_norm_are_refused(siglip_dir: Path) -> None:
    state = stage1_state(siglip_dir)
    state["tokenizer.inner_encoder.layers.1.0.weight"] = state["tokenizer.inner_encoder.layers.1.0.weight"] + 1
    with pytest.raises(convert.ConversionError, match="tokenizer.inner_encoder.layers.1.0.weight differs from"):
        convert.convert_setok(state, vision_config=siglip_dir, allow_partial=True, progress=False)


class NotATensor:
    pass


@pytest.mark.parametrize("payload", [NotATensor(), print], ids=["instance", "function"])
def test_pickle_with_objects_is_refused(tmp_path: Path, payload: object) -> None:
    torch.save({"tokenizer.out.weight": torch.zeros(2), "extra": payload}, tmp_path / "mm_projector.bin")
    with pytest.raises(convert.CheckpointError, match="refusing to load .*objects other than tensors"):
        convert.read_weight_file(tmp_path / "mm_projector.bin")


def test_non_tensor_values_and_unknown_vision_width_are_refused(siglip_dir: Path, tmp_path: Path) -> None:
    torch.save({"tokenizer.out.weight": torch.zeros(2), "step": 3}, tmp_path / "plain.bin")
    with pytest.raises(convert.CheckpointError, match="key 'step' holds a int"):
        convert.read_weight_file(tmp_path / "plain.bin")
    with pytest.raises(ValueError, match="--vision-config"):  # 32 wide: no SigLIP, so the head count is unknown
        convert.convert_setok(stage1_state(siglip_dir), allow_partial=True, progress=False)


def test_command_line_conversion(siglip_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    torch.save(stage1_state(siglip_dir), tmp_path / "mm_projector.bin")
    arguments = ["--stage1", str(tmp_path / "mm_projector.bin"), "--output", str(tmp_path / "out"),
                 "--vision-config", str(siglip_dir), "--threshold", "0.4", "--min-cluster-num", "4"]  # fmt: skip
    assert convert.main(arguments) == 1  # the detokenizer is not mapped: refused without --allow-partial
    assert "detokenizer.mapper_fc_in.weight" in capsys.readouterr().err and not (tmp_path / "out").exists()

    script = ROOT / "conversion" / "convert_setok_official.py"  # as a script, from any folder
    done = subprocess.run(
        [sys.executable, str(script), *arguments, "--allow-partial", "--dtype", "bfloat16"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "NOT MAPPED" in done.stdout and "detokenizer.pixel_decoder.{0-1}.attn.qkv.weight (2 keys)" in done.stdout
    assert "mapping vision tokenizer" in done.stderr  # progress
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["cluster_threshold"], config["cluster_k"], config["min_tokens"]) == (0.4, 4, 4)
    assert (tmp_path / "out" / "preprocessor_config.json").is_file()
    model = SetokModel.from_pretrained(tmp_path / "out")
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}


# ------------------------------------------------------------------------------------------------------------------
# Setokim composed from pretrained parts
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "dtype"), [("llama", "bfloat16"), ("qwen2", "auto")])
def test_composed_from_local_parts_loads_and_generates(
    siglip_dir: Path, tiny_tokenizer_dir: Path, tmp_path: Path, family: str, dtype: str
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    sizes = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    torch.manual_seed(0)
    if family == "llama":
        llm = LlamaForCausalLM(LlamaConfig(**sizes))
    else:
        llm = Qwen2ForCausalLM(Qwen2Config(**sizes, tie_word_embeddings=True))
    randomize_weights(llm, seed=3).save_pretrained(tmp_path / "llm")  # trained-looking norms
    tokenizer.save_pretrained(tmp_path / "llm")

    code = compose.main(
        ["--vision", str(siglip_dir), "--language-model", str(tmp_path / "llm"), "--output", str(tmp_path / "out"),
         "--cluster-threshold", "0.3", "--token-size", "24", "--merger-intermediate-size", "64", "--dtype", dtype]
    )  # fmt: skip
    assert code == 0
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "out").eval()
    expected_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32  # auto: the language model's
    assert {parameter.dtype for parameter in model.parameters()} == {expected_dtype}
    processor = AutoProcessor.from_pretrained(tmp_path / "out")
    assert model.config.setok_config.cluster_threshold == 0.3 and model.config.setok_config.token_size == 24
    assert len(processor.tokenizer) == len(tokenizer) + 3 == model.config.text_config.vocab_size
    siglip = SiglipModel.from_pretrained(siglip_dir)
    for key, value in siglip.vision_model.state_dict().items():
        assert torch.equal(model.model.setok.vision_model.state_dict()[key], value.to(expected_dtype)), key
    embeddings, original = model.get_input_embeddings().weight, llm.get_input_embeddings().weight.to(expected_dtype)
    torch.testing.assert_close(embeddings[: len(tokenizer)], original, atol=0, rtol=0)
    torch.testing.assert_close(embeddings[processor.image_start_token_id], original.mean(0), atol=1e-2, rtol=1e-2)

    processor.tokenizer.padding_side = "left"
    prompts = ["USER: <image>\nWhat is shown? ASSISTANT:", "USER: Describe <image> please. ASSISTANT:"]
    inputs = processor(
        text=prompts, images=[sample_image(), sample_image().rotate(90)], padding=True, return_tensors="pt"
    )
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, inputs.input_ids.shape[1] + 4)
    assert torch.equal(out[:, : inputs.input_ids.shape[1]], inputs.input_ids)


def test_composed_from_a_trained_setok_generates_the_same_tokens_after_saving(
    tiny_tokenizer_dir: Path, tmp_path: Path
) -> None:
    """Composing keeps a SeTok folder's trained merger; the folder written answers exactly as the model composed."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(0)
    setok = randomize_weights(SetokModel(tiny_setok_config(min_tokens=3)), seed=1)  # a trained merger
    setok.save_pretrained(tmp_path / "setok")
    llm = LlamaForCausalLM(
        LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    )  # fmt: skip
    randomize_weights(llm, seed=2).save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    composed, processor = compose.compose_setokim(
        tmp_path / "setok", tmp_path / "llm", tmp_path / "out", max_shard_size="200KB"
    )
    assert torch.equal(composed.model.setok.merger.out.bias, setok.merger.out.bias)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "out").eval()
    for name, value in composed.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], value), name
    processor.tokenizer.padding_side = "left"
    prompts = ["USER: <image>\nWhat is shown? ASSISTANT:", "USER: Describe <image> please. ASSISTANT:"]
    pictures = [sample_image(), sample_image().rotate(90)]
    inputs = processor(text=prompts, images=pictures, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, composed(**inputs).logits, rtol=0, atol=0)
    expected = composed.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(reloaded.generate(**inputs, max_new_tokens=6, do_sample=False), expected)


def test_compose_refuses_missing_parts_and_a_whole_setokim(siglip_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="detokenizer: no folder"):
        compose.compose_setokim(siglip_dir, tmp_path / "llm", detokenizer=tmp_path / "sd")
    assert compose.main(["--vision", "v", "--language-model", "l", "--output", "o", "--detokenizer", "sd"]) == 1
    (tmp_path / "setokim").mkdir()
    (tmp_path / "setokim" / "config.json").write_text(json.dumps({"model_type": "setokim"}))
    with pytest.raises(ValueError, match="is a whole Setokim"):
        compose.compose_setokim(tmp_path / "setokim", tmp_path / "llm")


def test_both_scripts_run_with_help(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_code:
        convert.main(["--help"])
    assert exit_code.value.code == 0 and "--allow-partial" in capsys.readouterr().out
    script = ROOT / "conversion" / "compose_setokim.py"
    result = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0 and "--language-model" in result.stdout, result.stderr
