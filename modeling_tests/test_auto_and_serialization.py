"""Auto registration, safetensors round trips and the `trust_remote_code` path without the plugin."""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import randomize_weights, run_without_plugin, tiny_setok_config, tiny_setokim_config
from pretraining_fixtures import tiny_pretraining_config
from transformers import AutoConfig, AutoImageProcessor, AutoModel, PreTrainedModel

from transformers_setok import (
    SetokConfig,
    SetokForPreTraining,
    SetokImageProcessor,
    SetokimForConditionalGeneration,
    SetokModel,
)


def save_tiny_setok(folder: Path) -> tuple[SetokModel, torch.Tensor]:
    """A tiny SeTok with trained-looking weights saved in `folder` with its image processor, and two images."""
    torch.manual_seed(0)
    model = randomize_weights(SetokModel(tiny_setok_config()), seed=1).eval()  # no zero biases or unit norms
    model.save_pretrained(folder)
    SetokImageProcessor(size={"height": 64, "width": 64}).save_pretrained(folder)
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    return model, pixels


def test_auto_classes_resolve_to_ours(tmp_path: Path) -> None:
    model, _ = save_tiny_setok(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)) is SetokConfig
    assert type(AutoModel.from_pretrained(tmp_path)) is SetokModel
    assert type(AutoImageProcessor.from_pretrained(tmp_path)) is SetokImageProcessor
    assert type(AutoModel.from_config(tiny_setok_config())) is SetokModel


def test_save_load_round_trip_is_identical(tmp_path: Path) -> None:
    model, pixels = save_tiny_setok(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin"))
    reloaded = SetokModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        before, after = model(pixels, min_tokens=4), reloaded(pixels, min_tokens=4)
    assert torch.equal(before.assignment, after.assignment)
    assert torch.equal(before.tokens, after.tokens)
    for name, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], value), name
    for field in ("cluster_k", "cluster_threshold", "min_tokens", "max_tokens", "hidden_size", "token_size"):
        assert getattr(reloaded.config, field) == getattr(model.config, field), field
    for field in ("hidden_size", "num_hidden_layers", "image_size", "patch_size"):
        assert getattr(reloaded.config.vision_config, field) == getattr(model.config.vision_config, field), field


def test_saved_configs_carry_an_auto_map(tmp_path: Path) -> None:
    save_tiny_setok(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_setok.SetokConfig",
        "AutoModel": "modeling_setok.SetokModel",
    }
    processor = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert processor["auto_map"] == {"AutoImageProcessor": "image_processing_setok.SetokImageProcessor"}
    for module in ("configuration_setok.py", "modeling_setok.py", "clustering.py", "image_processing_setok.py"):
        assert (tmp_path / module).exists(), module


REMOTE_CODE_SCRIPT = """
import sys
import torch
from transformers import AutoImageProcessor, AutoModel

folder = sys.argv[1]
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
assert "transformers_setok" not in sys.modules
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
with torch.no_grad():
    out = model(torch.load(sys.argv[2], weights_only=True), min_tokens=4)
torch.save({"tokens": out.tokens, "assignment": out.assignment}, sys.argv[3])
print(type(model).__name__, type(processor).__name__)
"""


def test_trust_remote_code_loads_without_the_plugin(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint"
    model, pixels = save_tiny_setok(folder)
    torch.save(pixels, tmp_path / "pixels.pt")
    stdout = run_without_plugin(
        REMOTE_CODE_SCRIPT, str(folder), str(tmp_path / "pixels.pt"), str(tmp_path / "out.pt"), workdir=tmp_path
    )
    assert "SetokModel SetokImageProcessor" in stdout
    remote = torch.load(tmp_path / "out.pt", weights_only=True)
    with torch.no_grad():
        local = model(pixels, min_tokens=4)  # several tokens per image, so attention and pooling take part
    assert torch.equal(remote["assignment"], local.assignment)
    torch.testing.assert_close(remote["tokens"], local.tokens, atol=1e-6, rtol=0)


@contextlib.contextmanager
def seeded_weight_init(seed: int = 42):
    """Every weight initialisation pass starts from `seed`, so the constructor and `from_pretrained` draw alike."""
    original = PreTrainedModel._initialize_weights

    def seeded(*args, **kwargs):
        torch.manual_seed(seed)
        original(*args, **kwargs)

    PreTrainedModel._initialize_weights = seeded
    try:
        yield
    finally:
        PreTrainedModel._initialize_weights = original


@pytest.mark.parametrize(
    "model_class, config",
    [
        (SetokModel, tiny_setok_config()),
        (SetokForPreTraining, tiny_pretraining_config()),
        (SetokimForConditionalGeneration, tiny_setokim_config()),
    ],
    ids=["setok", "pretraining", "setokim"],
)
def test_from_pretrained_initialises_missing_weights_as_the_constructor_does(model_class, config) -> None:
    """Weights a checkpoint lacks (here all of them) are drawn as the constructor draws them, the vision encoder's
    module-level inits (SigLIP's attention and MLP) included, not left to PyTorch's defaults."""
    with seeded_weight_init():
        constructed = model_class(copy.deepcopy(config))
        loaded = model_class.from_pretrained(None, config=copy.deepcopy(config), state_dict={})
    expected, actual = constructed.state_dict(), loaded.state_dict()
    assert sorted(actual) == sorted(expected)
    different = [name for name, value in expected.items() if not torch.equal(actual[name], value)]
    assert different == []
