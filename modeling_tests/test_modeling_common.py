"""Transformers' own common model tests and a generation test mixin, run against Setokim as against LLaVA.

`ModelTesterMixin` comes from `tests/test_modeling_common.py` of the installed transformers' source distribution,
fetched and cached by `transformers_common_tests`; the whole module skips, saying why, where no package index is
reachable. The tiny config pins the token count (`min_tokens == max_tokens`), so every 64x64 image becomes
`NUM_IMAGE_TOKENS` tokens and the expanded sequence length is known in advance, as the mixin expects.

Not run: `PipelineTesterMixin` (its tests load tiny checkpoints from the Hub) and `ConfigTester` (it imports
`tests/utils/`, which the sdist does not ship either; the configs have their own tests). The mixin skips some tests
itself, giving its reasons (`pytest -rs`): hardware (flash attention, accelerators, DeepSpeed, kernels), parts
Setokim does not have (experts, sliding windows, an encoder-decoder, position embeddings to resize), `@slow`
compilation, and `test_sdpa_can_dispatch_composite_models`, which finds the vision tower only under the names
LLaVA-style models use (Setokim's is `setok`).
"""

from __future__ import annotations

import copy
import inspect
import itertools
import re
import typing
import unittest
from collections.abc import Callable

import pytest
import torch
from conftest import tiny_setok_config, tiny_setokim_config
from transformers import PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, MODEL_MAPPING_NAMES
from transformers_common_tests import SourcesUnavailable, import_model_tester_mixin

from transformers_setok import SetokimConfig, SetokimForConditionalGeneration, SetokimModel

pytest.importorskip(
    "parameterized", reason="Transformers' common tests need `parameterized` (pip install parameterized)"
)
try:
    common = import_model_tester_mixin()
except SourcesUnavailable as error:
    pytest.skip(str(error), allow_module_level=True)

from generation_tester_mixin import GenerationTesterMixin  # noqa: E402  (the same class the common tests import)

NUM_IMAGE_TOKENS = 4
TEXT_LENGTH = 7  # `[Img] <image> [/Img]` and four text tokens

# Keys are test names, or patterns over the cases `parameterized` expands a test into.
# Tests that cannot apply to run-time placeholder expansion, or that need hardware this machine lacks.
SKIPS: dict[str, str] = {
    "test_model_rope_scaling_from_config": (
        "feeds random ids over the whole vocabulary as text without pixel_values; they include the image "
        "placeholder, which Setokim rejects without its image (by design: nothing is silently ignored). RoPE "
        "scaling lives in the language model, whose own tests cover it"
    ),
}
if not torch.cuda.is_available():
    SKIPS[r"test_eager_matches_sdpa_inference_\d+_(fp16|bf16)_.*"] = (
        "half-precision eager/SDPA agreement is a property of accelerator kernels; on CPU these 16 cases would "
        "cost most of this module's time, and the float32 cases run the same code paths"
    )


class SetokimModelTester:
    """Config and inputs in the shape `ModelTesterMixin` reads: 7 rows of 7 tokens, one image each.

    Seven rows because the eager/SDPA comparison pads every input to 7 rows with random values, which would give
    `input_ids` without placeholders for the extra images.
    """

    def __init__(self, parent: unittest.TestCase, batch_size: int = 7) -> None:
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = TEXT_LENGTH
        self.encoder_seq_length = TEXT_LENGTH - 1 + NUM_IMAGE_TOKENS  # what the language model sees
        self.is_training = True
        config = self.get_config()
        self.text_config = config.text_config.to_dict()
        self.vision_config = config.setok_config.vision_config.to_dict()
        self.num_hidden_layers = config.text_config.num_hidden_layers
        self.num_attention_heads = config.text_config.num_attention_heads
        self.hidden_size = config.text_config.hidden_size
        self.vocab_size = config.text_config.vocab_size
        self.image_size = config.setok_config.vision_config.image_size
        self.patch_size = config.setok_config.vision_config.patch_size

    def get_config(self) -> SetokimConfig:
        """The conftest's tiny Setokim, its token count pinned and its three widths distinct.

        Vision encoder 32, SeTok tokens 24, language model 48: a tensor of the wrong one of them fails a shape check.
        """
        setok_config = tiny_setok_config(min_tokens=NUM_IMAGE_TOKENS, max_tokens=NUM_IMAGE_TOKENS)
        text_config = {**tiny_setokim_config().text_config.to_dict(), "hidden_size": 48, "head_dim": 12}
        return tiny_setokim_config(setok_config=setok_config, text_config=text_config)

    def prepare_config_and_inputs_for_common(self) -> tuple:
        config = self.get_config()
        pixel_values = common.floats_tensor([self.batch_size, 3, self.image_size, self.image_size])
        # text ids avoid the special ids (pad, bos, eos) and the image ids at the top of the vocabulary
        input_ids = common.ids_tensor([self.batch_size, self.seq_length], config.image_token_id - 3) + 3
        input_ids[:, 1:4] = torch.tensor(
            [config.image_start_token_id, config.image_token_id, config.image_end_token_id]
        )
        inputs = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "pixel_values": pixel_values,
        }
        return config, inputs


# The mixin tells base models and image-text-to-text heads apart by Transformers' own name tables (it picks which
# classes get labels, which train, which carry `get_image_features`), as if Setokim were in the library.
AUTO_MODEL_NAMES = (
    (MODEL_MAPPING_NAMES, SetokimModel.__name__),
    (MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, SetokimForConditionalGeneration.__name__),
)


def assert_equivalent(actual: object, expected: object, where: str) -> None:
    """`actual` holds what `expected` holds at every depth; tensors within 1e-5, bool and integer ones exactly."""
    if isinstance(expected, torch.Tensor):
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5, msg=lambda message: f"{where}: {message}")
    elif isinstance(expected, (tuple, list, dict)):
        if isinstance(expected, dict):
            assert list(actual) == list(expected), f"{where}: keys {list(actual)} != {list(expected)}"
            actual, expected = list(actual.values()), list(expected.values())
        assert len(actual) == len(expected), f"{where}: {len(actual)} entries != {len(expected)}"
        for index, (actual_item, expected_item) in enumerate(zip(actual, expected)):
            assert_equivalent(actual_item, expected_item, f"{where}[{index}]")
    else:  # None, counts, caches: the same kind of object
        assert type(actual) is type(expected), f"{where}: {type(actual).__name__} != {type(expected).__name__}"


def favour_token(token_id: int) -> Callable[..., torch.Tensor]:
    """A forward hook for an LM head that makes `token_id` the most likely next token everywhere."""

    def hook(module: torch.nn.Module, args: tuple, logits: torch.Tensor) -> torch.Tensor:
        return logits + 1e4 * (torch.arange(logits.shape[-1], device=logits.device) == token_id)

    return hook


class SetokimForConditionalGenerationModelTest(common.ModelTesterMixin, GenerationTesterMixin, unittest.TestCase):
    all_model_classes = (SetokimModel, SetokimForConditionalGeneration)
    additional_model_inputs = ["pixel_values"]
    _is_composite = True
    test_can_init_all_missing_weights_before_2023 = True  # the mixin dates models by a copyright line

    @classmethod
    def setUpClass(cls) -> None:
        for names, class_name in AUTO_MODEL_NAMES:
            names[SetokimConfig.model_type] = class_name

    @classmethod
    def tearDownClass(cls) -> None:
        for names, _ in AUTO_MODEL_NAMES:
            del names[SetokimConfig.model_type]

    def setUp(self) -> None:
        self.model_tester = SetokimModelTester(self)

    def assert_every_part_can_set_attention(self) -> None:
        """The mixin skips attention-switching tests when a part cannot switch; here that is a failure."""
        model = SetokimForConditionalGeneration(self.model_tester.get_config())
        parts = [module for module in model.modules() if isinstance(module, PreTrainedModel)]
        fixed = [type(part).__name__ for part in parts if not part._can_set_attn_implementation()]
        self.assertEqual(fixed, [], "these parts do not go through ALL_ATTENTION_FUNCTIONS")

    def test_forward_declares_output_attentions(self):
        """The mixin finds `output_attentions` in `forward`'s `**kwargs: Unpack[...]`; where it cannot, it skips."""
        for model_class in self.all_model_classes:
            annotation = inspect.signature(model_class.forward).parameters["kwargs"].annotation
            typed_kwargs = typing.get_args(annotation)
            self.assertTrue(
                typed_kwargs and "output_attentions" in typed_kwargs[0].__annotations__,
                f"{model_class.__name__}.forward(**kwargs: {annotation!r})",
            )

    def test_can_set_attention_dynamically(self):
        self.assert_every_part_can_set_attention()
        super().test_can_set_attention_dynamically()

    def test_can_set_attention_dynamically_composite_model(self):
        self.assert_every_part_can_set_attention()
        super().test_can_set_attention_dynamically_composite_model()

    def test_multimodal_outputs_are_returned(self):
        # the mixin checks nothing for a config without `vision_config`, taking it for a text-only model
        self.assertIsNotNone(getattr(self.model_tester.get_config(), "vision_config", None), "no vision_config")
        super().test_multimodal_outputs_are_returned()

    def test_model_outputs_equivalence(self):
        """The mixin's test, bool-safe: it formats `tuple - dict` into its failure message before comparing, which
        bool tensors (the token masks) refuse. Transformers' Hiera test overrides it for its bool mask likewise."""
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        flags = [{}, {"output_hidden_states": True}, {"output_attentions": True}]
        flags.append({**flags[1], **flags[2]})
        for model_class in self.all_model_classes:
            model = model_class(copy.deepcopy(config)).eval()
            for return_labels, extra in itertools.product((False, True), flags):
                prepared = self._prepare_for_class(inputs, model_class, return_labels=return_labels)
                with torch.no_grad():
                    as_tuple = model(**prepared, **extra, return_dict=False)
                    as_dict = model(**prepared, **extra, return_dict=True)
                with self.subTest(model_class.__name__, return_labels=return_labels, **extra):
                    assert_equivalent(as_tuple, as_dict.to_tuple(), "output")

    def _logits_scored_by_loss(self, model, logits):
        """The logits the caller's `shift_labels` line up with: each caller position's last expanded one (an image's
        other positions target the image's next position, which no caller label names)."""
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        repeats = torch.where(inputs["input_ids"] == config.image_token_id, NUM_IMAGE_TOKENS, 1)
        last = repeats.cumsum(dim=1) - 1
        return logits.gather(1, last[..., None].expand(-1, -1, logits.shape[-1]).to(logits.device))

    def reference_next_token_scores(self, model, logits):
        """Text generation never writes the image placeholder (issue 11), so the reference never picks it."""
        return logits.masked_fill(torch.arange(logits.shape[-1]) == model.config.image_token_id, float("-inf"))

    def test_generate_never_writes_the_image_placeholder(self):
        """Even where the language model ranks `<image>` first, text generation writes the next-best token."""
        for model, inputs in self.generative_models():
            model.lm_head.register_forward_hook(favour_token(model.config.image_token_id))
            text_only = {"input_ids": inputs["input_ids"][:, 4:], "attention_mask": inputs["attention_mask"][:, 4:]}
            for prompt in (inputs, text_only):
                torch.testing.assert_close(
                    self.new_tokens(self.generate(model, prompt), prompt),
                    self.reference_greedy(model, prompt, self.max_new_tokens)[0],
                )


def skip_tests(test_class: type, reasons: dict[str, str]) -> None:
    """Skip each test a key names, and every case `parameterized` expanded it into, giving its reason."""
    for pattern, reason in reasons.items():
        cases = [attribute for attribute in dir(test_class) if re.fullmatch(rf"{pattern}(_\d+.*)?", attribute)]
        if not cases:
            raise AssertionError(f"{test_class.__name__} has no test matching {pattern}")
        for case in cases:
            setattr(test_class, case, pytest.mark.skip(reason=reason)(getattr(test_class, case)))


skip_tests(SetokimForConditionalGenerationModelTest, SKIPS)
