"""The SeTok vision tokenizer: merger equivalence, batch invariance, budgets, round trips, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import randomize_weights, tiny_setok_config
from huggingface_hub.errors import StrictDataclassError
from PIL import Image, ImageDraw

from transformers_setok import SetokImageProcessor, SetokModel
from transformers_setok.clustering import density_peak_clustering
from transformers_setok.modeling_setok import sincos_position_code


def tiny_processor() -> SetokImageProcessor:
    return SetokImageProcessor(size={"height": 64, "width": 64})


def sample_images() -> list[Image.Image]:
    """A flat image, a simple one and a cluttered one, in increasing complexity."""
    flat = Image.new("RGB", (64, 64), (120, 160, 200))
    shapes = Image.new("RGB", (64, 64), (255, 255, 255))
    draw = ImageDraw.Draw(shapes)
    draw.rectangle([0, 0, 31, 63], fill=(255, 0, 0))
    draw.ellipse([36, 10, 60, 50], fill=(0, 0, 255))
    clutter = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    return [flat, shapes, clutter]


def pixel_values(images: list[Image.Image]) -> torch.Tensor:
    return tiny_processor()(images=images, return_tensors="pt").pixel_values


def reference_position_code(height: int, width: int, dim: int) -> torch.Tensor:
    """The official SeTok 2-D code written out entry by entry."""
    channels = int(np.ceil(dim / 4) * 2)
    code = torch.zeros(height, width, 2 * channels)
    for row in range(height):
        for col in range(width):
            for i in range(channels // 2):
                freq = 1.0 / 10000 ** (2 * i / channels)
                code[row, col, 2 * i] = math.sin(row * freq)
                code[row, col, 2 * i + 1] = math.cos(row * freq)
                code[row, col, channels + 2 * i] = math.sin(col * freq)
                code[row, col, channels + 2 * i + 1] = math.cos(col * freq)
    return code[..., :dim].reshape(height * width, dim)


@pytest.mark.parametrize(("height", "width", "dim"), [(4, 4, 8), (3, 5, 10), (2, 3, 7)])
def test_position_code_matches_official_layout(height: int, width: int, dim: int) -> None:
    code = sincos_position_code(height, width, dim, torch.float32, torch.device("cpu"))
    torch.testing.assert_close(code, reference_position_code(height, width, dim), atol=1e-6, rtol=0)


def reference_layer_norm(x: torch.Tensor, state: dict, name: str, eps: float) -> torch.Tensor:
    mean = x.mean(dim=-1, keepdim=True)
    variance = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(variance + eps) * state[f"{name}.weight"] + state[f"{name}.bias"]


def reference_linear(x: torch.Tensor, state: dict, name: str) -> torch.Tensor:
    return x @ state[f"{name}.weight"].T + state[f"{name}.bias"]


def reference_attention(x: torch.Tensor, state: dict, name: str, heads: int) -> torch.Tensor:
    """Softmax attention among all of `x` (`(n, width)`), written as matrix products: `softmax(q k^T / sqrt(d)) v`."""
    length, width = x.shape
    head_size = width // heads
    query, key, value = reference_linear(x, state, f"{name}.qkv").view(length, 3, heads, head_size).unbind(1)
    query, key, value = (t.transpose(0, 1) for t in (query, key, value))  # (heads, n, head_size)
    scores = query @ key.transpose(1, 2) / math.sqrt(head_size)
    weights = scores.exp() / scores.exp().sum(dim=-1, keepdim=True)
    mixed = (weights @ value).transpose(0, 1).reshape(length, width)
    return reference_linear(mixed, state, f"{name}.proj")


def reference_encoder(x: torch.Tensor, state: dict, name: str, config) -> torch.Tensor:
    """A merger encoder: residual pre-norm attention layers, then one residual pre-norm GELU MLP."""
    eps = config.layer_norm_eps
    depth = 1 + max(int(key.split(".")[2]) for key in state if key.startswith(f"{name}.layers."))
    for index in range(depth):
        layer = f"{name}.layers.{index}"
        normed = reference_layer_norm(x, state, f"{layer}.norm", eps)
        x = x + reference_attention(normed, state, f"{layer}.attention", config.num_attention_heads)
    hidden = reference_linear(reference_layer_norm(x, state, f"{name}.mlp_norm", eps), state, f"{name}.mlp.fc1")
    hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
    return x + reference_linear(hidden, state, f"{name}.mlp.fc2")


def per_cluster_merger(model: SetokModel, features: torch.Tensor, assignment: torch.Tensor) -> torch.Tensor:
    """Tokens of one image from the merger's weights alone.

    Every cluster runs through the inner encoder by itself and is mean-pooled; the cluster tokens then run through
    the inter encoder and the output layer.
    """
    state = model.merger.state_dict()
    config = model.config
    pooled = [
        reference_encoder(features[assignment == cluster], state, "inner_encoder", config).mean(dim=0)
        for cluster in range(int(assignment.max()) + 1)
    ]
    return reference_linear(reference_encoder(torch.stack(pooled), state, "inter_encoder", config), state, "out")


@pytest.mark.parametrize("threshold", [0.3, 0.5])
def test_batched_merger_equals_per_cluster_reference(tiny_setok: SetokModel, threshold: float) -> None:
    randomize_weights(tiny_setok.merger, seed=3)  # non-zero biases and non-unit norms, as after training
    with torch.no_grad():
        out = tiny_setok(pixel_values(sample_images()), cluster_threshold=threshold)
        features = out.patch_features + sincos_position_code(8, 8, 32, torch.float32, torch.device("cpu"))
        assert out.num_tokens.min() < out.num_tokens.max() and int(out.num_tokens.max()) > 2
        for image in range(3):
            reference = per_cluster_merger(tiny_setok, features[image], out.assignment[image])
            count = int(out.num_tokens[image])
            torch.testing.assert_close(out.tokens[image, :count], reference, atol=1e-5, rtol=1e-5)
            assert (out.tokens[image, count:] == 0).all()


def test_output_fields_are_consistent(tiny_setok: SetokModel) -> None:
    with torch.no_grad():
        out = tiny_setok(pixel_values(sample_images()))
    batch, max_tokens = out.token_mask.shape
    assert out.tokens.shape == (batch, max_tokens, 24)
    assert out.grid_size == (8, 8)
    assert out.assignment.shape == out.scores.shape == (3, 64)
    assert out.patch_features.shape == (3, 64, 32)
    assert torch.equal(out.token_mask.sum(-1), out.num_tokens)
    assert max_tokens == int(out.num_tokens.max())
    for image in range(batch):
        count = int(out.num_tokens[image])
        assert sorted(out.assignment[image].unique().tolist()) == list(range(count)), "every token owns patches"
        centers = out.centers[image, :count]
        assert out.assignment[image, centers].tolist() == list(range(count)), "a centre belongs to its own token"


def test_flat_image_gets_fewer_tokens_than_cluttered(tiny_setok: SetokModel) -> None:
    with torch.no_grad():
        counts = tiny_setok(pixel_values(sample_images())).num_tokens.tolist()
    flat, shapes, clutter = counts
    assert flat < clutter
    assert len(set(counts)) > 1, "the count follows the content"


def test_padded_batch_equals_images_one_by_one(tiny_setok: SetokModel) -> None:
    images = pixel_values(sample_images())
    with torch.no_grad():
        batched = tiny_setok(images)
        for image in range(3):
            alone = tiny_setok(images[image : image + 1])
            count = int(alone.num_tokens[0])
            assert int(batched.num_tokens[image]) == count
            assert torch.equal(batched.assignment[image], alone.assignment[0])
            torch.testing.assert_close(batched.tokens[image, :count], alone.tokens[0], atol=1e-5, rtol=1e-5)


def test_per_call_budget_and_threshold(tiny_setok: SetokModel) -> None:
    images = pixel_values(sample_images())
    with torch.no_grad():
        counts = [tiny_setok(images, cluster_threshold=t).num_tokens for t in (0.0, 0.2, 0.3, 0.4, 0.6, 2.0)]
        bounded = tiny_setok(images, cluster_threshold=0.3, min_tokens=4, max_tokens=6)
        exact = tiny_setok(images, min_tokens=10, max_tokens=10)
        default_k = tiny_setok(images)
        wide_k = tiny_setok(images, cluster_k=12)
    for higher, lower in zip(counts[1:], counts[:-1]):
        assert (higher <= lower).all()
    assert torch.equal(bounded.num_tokens, counts[2].clamp(4, 6))
    assert exact.num_tokens.tolist() == [10, 10, 10]
    assert exact.tokens.shape[1] == 10
    assert not torch.equal(wide_k.scores, default_k.scores), "cluster_k changes the density estimate"


def test_budget_from_config() -> None:
    torch.manual_seed(0)
    model = SetokModel(tiny_setok_config(min_tokens=3, max_tokens=5)).eval()
    with torch.no_grad():
        counts = model(pixel_values(sample_images())).num_tokens
    assert ((counts >= 3) & (counts <= 5)).all()


def test_merger_width_differs_from_encoder() -> None:
    torch.manual_seed(0)
    model = SetokModel(tiny_setok_config(hidden_size=16)).eval()
    assert isinstance(model.input_projection, torch.nn.Linear)
    with torch.no_grad():
        out = model(pixel_values(sample_images()))
    assert out.tokens.shape[-1] == 24 and torch.isfinite(out.tokens).all()


def test_gradients_reach_the_merger(tiny_setok: SetokModel) -> None:
    tiny_setok.train()
    out = tiny_setok(pixel_values(sample_images()))
    (out.tokens**2).sum().backward()
    for name, parameter in tiny_setok.merger.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_gradient_checkpointing_matches(tiny_setok: SetokModel) -> None:
    images = pixel_values(sample_images())
    tiny_setok.train()
    plain = tiny_setok(images).tokens
    plain.sum().backward()
    expected = {n: p.grad.clone() for n, p in tiny_setok.merger.named_parameters()}
    tiny_setok.zero_grad()
    tiny_setok.activation_checkpointing_enable()
    checkpointed = tiny_setok(images).tokens
    checkpointed.sum().backward()
    torch.testing.assert_close(checkpointed, plain)
    for name, parameter in tiny_setok.merger.named_parameters():
        torch.testing.assert_close(parameter.grad, expected[name], atol=1e-5, rtol=1e-4)


def test_cls_strategy_on_a_cls_free_encoder_is_named() -> None:
    config = tiny_setok_config(vision_feature_select_strategy="default")
    model = SetokModel(config).eval()
    with pytest.raises(ValueError, match="vision_feature_select_strategy"):
        model(pixel_values(sample_images()[:1]))


@pytest.mark.parametrize(
    ("pixels", "kwargs", "error", "message"),
    [
        (torch.zeros(1, 4, 64, 64), {}, ValueError, "3 channels"),
        (torch.zeros(3, 64, 64), {}, ValueError, "pixel_values must be"),
        (torch.zeros(0, 3, 64, 64), {}, ValueError, "batch size 0"),
        (torch.full((1, 3, 64, 64), float("nan")), {}, ValueError, "finite"),
        (np.zeros((1, 3, 64, 64), dtype=np.float32), {}, TypeError, "torch.Tensor"),
        (torch.zeros(1, 3, 64, 64), {"cluster_threshold": -1.0}, ValueError, "threshold"),
        (torch.zeros(1, 3, 64, 64), {"min_tokens": 5, "max_tokens": 2}, ValueError, "max_tokens"),
        (torch.zeros(1, 3, 64, 64), {"cluster_k": 65}, ValueError, "k must be between"),
    ],
)
def test_bad_input_is_named(tiny_setok: SetokModel, pixels, kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        tiny_setok(pixels, **kwargs)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(cluster_k=0), "cluster_k"),
        (dict(cluster_threshold=-0.5), "cluster_threshold"),
        (dict(min_tokens=0), "min_tokens"),
        (dict(min_tokens=8, max_tokens=4), "max_tokens"),
        (dict(num_attention_heads=5), "num_attention_heads"),
        (dict(vision_feature_select_strategy="cls"), "vision_feature_select_strategy"),
    ],
)
def test_bad_config_is_named(overrides: dict, message: str) -> None:
    with pytest.raises(StrictDataclassError, match=message):
        tiny_setok_config(**overrides)


def test_bfloat16_model_runs_and_clusters_in_float32() -> None:
    torch.manual_seed(0)
    model = SetokModel(tiny_setok_config()).eval().to(torch.bfloat16)
    with torch.no_grad():
        out = model(pixel_values(sample_images()).to(torch.bfloat16))
    assert out.tokens.dtype == torch.bfloat16 and torch.isfinite(out.tokens.float()).all()
    assert out.scores.dtype == torch.float32
    features = out.patch_features + sincos_position_code(8, 8, 32, torch.bfloat16, torch.device("cpu"))
    as_float = density_peak_clustering(features.float(), k=5, threshold=0.3)
    assert torch.equal(out.assignment, as_float.assignment), "bf16 features cluster as their float32 values do"


def test_the_encoders_own_size_may_leave_edge_pixels_out() -> None:
    """SigLIP so400m-patch14-384 reads 27x27 patches of 14 pixels from its 384x384 input, dropping 6 at the edges."""
    torch.manual_seed(0)
    setok = SetokModel(
        tiny_setok_config(vision_config={**tiny_setok_config().vision_config.to_dict(), "image_size": 68})
    )
    with torch.no_grad():
        out = setok.eval()(torch.randn(1, 3, 68, 68))
    assert out.grid_size == (8, 8) and out.patch_features.shape[1] == 64
