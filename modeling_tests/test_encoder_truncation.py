"""The vision encoder stops at the feature layer: same features, no later layers or head run, all weights kept."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import randomize_weights, tiny_setok_config
from safetensors import safe_open

from transformers_setok import SetokModel
from transformers_setok.modeling_setok import encoder_layers

ENCODERS = {
    "siglip": dict(model_type="siglip_vision_model"),
    "clip": dict(model_type="clip_vision_model"),
    "vit": dict(model_type="vit"),
}


def setok_on(encoder: str, feature_layer: int, num_layers: int = 3) -> SetokModel:
    """A seeded tiny SeTok on a `num_layers`-layer encoder of the given family, reading `feature_layer`."""
    vision_config = dict(
        ENCODERS[encoder],
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    config = tiny_setok_config(
        vision_config=vision_config,
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy="full" if encoder == "siglip" else "default",  # CLIP and ViT lead with CLS
    )
    torch.manual_seed(0)
    return randomize_weights(SetokModel(config), seed=1).eval()


def pixels(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def modules_that_run(model: SetokModel, run) -> set[str]:
    """Names (relative to the vision encoder) of the encoder's modules whose forward `run()` completes."""
    called, handles = set(), []
    for name, module in model.vision_model.named_modules():
        handles.append(module.register_forward_hook(lambda module, args, output, name=name: called.add(name)))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return called


def layer_prefix(model: SetokModel) -> str:
    layers = encoder_layers(model.vision_model)
    return next(name for name, module in model.vision_model.named_modules() if module is layers)


@pytest.mark.parametrize("encoder", sorted(ENCODERS))
@pytest.mark.parametrize("feature_layer", [0, 1, 2, -2, -3, -1, 3])
def test_features_equal_the_full_encoders_hidden_state(encoder: str, feature_layer: int) -> None:
    model = setok_on(encoder, feature_layer)
    with torch.no_grad():
        full = model.vision_model(pixel_values=pixels(), output_hidden_states=True).hidden_states
        expected = full[feature_layer] if encoder == "siglip" else full[feature_layer][:, 1:]
        features, grid_size = model.get_patch_features(pixels())
        output = model(pixels())
        reference = model.tokenize_features(expected, grid_size)
    assert torch.equal(features, expected)
    assert torch.equal(output.patch_features, expected)
    assert torch.equal(output.tokens, reference.tokens)
    assert torch.equal(output.assignment, reference.assignment)

    prefix = layer_prefix(model)
    ran = modules_that_run(model, lambda: model.get_patch_features(pixels()))
    layers_run = sorted({int(name[len(prefix) + 1 :].split(".")[0]) for name in ran if name.startswith(prefix + ".")})
    reads_last = feature_layer % 4 == 3
    assert layers_run == list(range(3 if reads_last else feature_layer % 4))
    outside_layers = {name.rsplit(".", 1)[-1] for name in ran if not name.startswith(prefix)}
    assert bool(outside_layers & {"post_layernorm", "layernorm", "head", "pooler"}) == reads_last


def test_siglip_head_and_later_layers_neither_run_nor_get_gradients() -> None:
    model = setok_on("siglip", -2).train()
    ran = modules_that_run(model, lambda: model.get_patch_features(pixels()))
    assert {name.split(".")[0] for name in ran} == {"embeddings", "encoder"}
    assert not any(name.startswith(("encoder.layers.2", "post_layernorm", "head")) for name in ran)

    model(pixels()).tokens.sum().backward()
    with_gradient = {name for name, parameter in model.vision_model.named_parameters() if parameter.grad is not None}
    early = {
        name
        for name in dict(model.vision_model.named_parameters())
        if name.startswith(("embeddings.", "encoder.layers.0.", "encoder.layers.1."))
    }
    assert with_gradient == early
    assert all(model.vision_model.get_parameter(name).grad.abs().sum() > 0 for name in early)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients_through_the_truncated_encoder(use_reentrant: bool) -> None:
    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = setok_on("siglip", -2).train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
            assert model.vision_model.encoder.layers[1].gradient_checkpointing
        model.get_patch_features(pixels())[0].pow(2).sum().backward()
        return {name: p.grad for name, p in model.vision_model.named_parameters() if p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys() and "encoder.layers.1.mlp.fc2.weight" in plain
    for name, gradient in plain.items():
        torch.testing.assert_close(checkpointed[name], gradient, msg=name)


def test_asking_for_every_hidden_state_runs_the_whole_encoder() -> None:
    model = setok_on("siglip", -2)
    with torch.no_grad():
        truncated = model(pixels())
        output = model(pixels(), output_hidden_states=True)
    assert len(output.hidden_states) == 4 and truncated.hidden_states is None
    assert torch.equal(output.hidden_states[-2], output.patch_features)
    assert torch.equal(truncated.patch_features, output.patch_features)
    assert torch.equal(truncated.tokens, output.tokens)


def test_saved_then_loaded_model_keeps_every_encoder_weight(tmp_path: Path) -> None:
    model = setok_on("siglip", -2)
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as saved:
        saved_keys = set(saved.keys())
    state = model.state_dict()
    assert {key for key in state if key.startswith("vision_model.")} <= saved_keys
    assert {"vision_model.encoder.layers.2.mlp.fc2.weight", "vision_model.head.probe"} <= saved_keys

    loaded = SetokModel.from_pretrained(tmp_path).eval()
    loaded_state = loaded.state_dict()
    assert loaded_state.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded_state[key], value), key
    with torch.no_grad():
        assert torch.equal(loaded(pixels()).tokens, model(pixels()).tokens)


def test_feature_layer_out_of_range_is_named() -> None:
    model = setok_on("siglip", 4)
    with pytest.raises(ValueError, match="vision_feature_layer must index the 4 hidden states .* got 4"):
        model.get_patch_features(pixels())
    model.config.vision_feature_layer = -5
    with pytest.raises(ValueError, match="vision_feature_layer must index the 4 hidden states .* got -5"):
        model(pixels(), output_hidden_states=True)
