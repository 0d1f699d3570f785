"""Setokim behaves like every Transformers model: tuples, inputs_embeds, image features, decoding, cache reuse,
attention implementations."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    IMAGE_END_ID,
    IMAGE_START_ID,
    IMAGE_TOKEN_ID,
    left_pad,
    tiny_setok_config,
    tiny_setokim_config,
)
from conftest import random_pixel_values as images
from transformers.generation import BaseStreamer

from transformers_setok import SetokimForConditionalGeneration, SetokimModel, SetokModel

IMAGE = [IMAGE_START_ID, IMAGE_TOKEN_ID, IMAGE_END_ID]


def setokim(**overrides) -> SetokimForConditionalGeneration:
    torch.manual_seed(0)
    return SetokimForConditionalGeneration(tiny_setokim_config(**overrides)).eval()


@pytest.fixture
def model() -> SetokimForConditionalGeneration:
    return setokim()


def left_padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    return left_pad([[1, 5, *IMAGE, 6, 7], [1, *IMAGE, 8, 9, *IMAGE, 10, 11, 12]])


def greedy(model: SetokimForConditionalGeneration, **inputs) -> torch.Tensor:
    return model.generate(**inputs, max_new_tokens=6, do_sample=False)


# --- tuples -----------------------------------------------------------------------------------------------


def test_return_dict_false_gives_the_dataclass_fields_as_a_tuple(model: SetokimForConditionalGeneration) -> None:
    ids, mask = left_padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        as_dict = model(input_ids=ids, attention_mask=mask, pixel_values=images(3), labels=labels)
        as_tuple = model(input_ids=ids, attention_mask=mask, pixel_values=images(3), labels=labels, return_dict=False)
        base_tuple = model.model(input_ids=ids, attention_mask=mask, pixel_values=images(3), return_dict=False)
    assert isinstance(as_tuple, tuple) and isinstance(base_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], as_dict.loss)
    torch.testing.assert_close(as_tuple[1], as_dict.logits)
    torch.testing.assert_close(
        base_tuple[0], model.model(input_ids=ids, attention_mask=mask, pixel_values=images(3)).last_hidden_state
    )


def test_config_return_dict_false_gives_tuples(model: SetokimForConditionalGeneration) -> None:
    model.config.return_dict = False
    with torch.no_grad():
        output = model(input_ids=torch.tensor([[1, *IMAGE, 5]]), pixel_values=images(1))
        features = model.get_image_features(images(1))
    assert isinstance(output, tuple) and isinstance(features, tuple)


# --- inputs_embeds ----------------------------------------------------------------------------------------


def test_inputs_embeds_with_pixel_values_equal_input_ids(model: SetokimForConditionalGeneration) -> None:
    ids, mask = left_padded_batch()
    embeds = model.get_input_embeddings()(ids).detach()
    with torch.no_grad():
        from_ids = model(input_ids=ids, attention_mask=mask, pixel_values=images(3))
        from_embeds = model(inputs_embeds=embeds, attention_mask=mask, pixel_values=images(3))
    torch.testing.assert_close(from_embeds.logits, from_ids.logits, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(from_embeds.attention_mask, from_ids.attention_mask)

    generated = greedy(model, input_ids=ids, attention_mask=mask, pixel_values=images(3))
    generated_from_embeds = greedy(model, inputs_embeds=embeds, attention_mask=mask, pixel_values=images(3))
    # with inputs_embeds, generate returns only the new tokens, as for any Transformers model
    assert torch.equal(generated_from_embeds, generated[:, ids.shape[1] :])


def test_conflicting_arguments_raise(model: SetokimForConditionalGeneration) -> None:
    ids = torch.tensor([[1, *IMAGE, 5]])
    embeds = model.get_input_embeddings()(ids).detach()
    prepared = model.model.prepare_multimodal_inputs(ids, images(1))
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model(input_ids=ids, inputs_embeds=embeds, pixel_values=images(1))
    expanded_embeds = model.get_input_embeddings()(prepared.input_ids).detach()
    with pytest.raises(ValueError, match="image_embeds fill the image positions of input_ids"):
        model(inputs_embeds=expanded_embeds, image_embeds=prepared.image_embeds)
    with pytest.raises(ValueError, match="no pixel_values were given"):
        model(inputs_embeds=embeds)  # placeholder embeddings without their images
    with pytest.raises(ValueError, match=r"\['max_tokens'\] set how images are tokenized"):
        model(input_ids=torch.tensor([[1, 5]]), max_tokens=2)
    with pytest.raises(ValueError, match="position_ids cannot be given"):
        model.generate(input_ids=ids, pixel_values=images(1), position_ids=torch.arange(5)[None], max_new_tokens=1)


# --- image features ---------------------------------------------------------------------------------------


def test_get_image_features_follows_the_transformers_contract(model: SetokimForConditionalGeneration) -> None:
    pixels = images(3)
    with torch.no_grad():
        features = model.get_image_features(pixels)
        with_states = model.get_image_features(pixels, output_hidden_states=True)
        as_tuple = model.get_image_features(pixels, return_dict=False)
        tokens = model.model.setok(pixels)
        projected = model.model.multi_modal_projector(tokens.tokens)
    torch.testing.assert_close(features.last_hidden_state, tokens.patch_features)
    assert len(features.pooler_output) == 3
    for image, count in enumerate(tokens.num_tokens.tolist()):
        torch.testing.assert_close(features.pooler_output[image], projected[image, :count])
    torch.testing.assert_close(features.image_embeds, projected)
    assert features.hidden_states is None
    vision_layers = model.config.setok_config.vision_config.num_hidden_layers
    assert len(with_states.hidden_states) == vision_layers + 1
    torch.testing.assert_close(with_states.hidden_states[-2], tokens.patch_features)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], features.last_hidden_state)


def test_per_call_clustering_equals_the_same_settings_in_the_config() -> None:
    pinned = setokim(setok_config=tiny_setok_config(max_tokens=2, cluster_threshold=0.0))
    free = setokim()
    free.load_state_dict(pinned.state_dict())
    override = dict(max_tokens=2, cluster_threshold=0.0)
    ids = torch.tensor([[1, 5, *IMAGE, 6]])
    with torch.no_grad():
        assert pinned.get_image_features(images(2)).num_tokens.tolist() == [2, 2]
        torch.testing.assert_close(
            free.get_image_features(images(2), **override).image_embeds,
            pinned.get_image_features(images(2)).image_embeds,
        )
        torch.testing.assert_close(
            free(input_ids=ids, pixel_values=images(1), **override).logits,
            pinned(input_ids=ids, pixel_values=images(1)).logits,
        )
    assert torch.equal(
        greedy(free, input_ids=ids, pixel_values=images(1), **override),
        greedy(pinned, input_ids=ids, pixel_values=images(1)),
    )
    assert not torch.equal(
        free(input_ids=ids, pixel_values=images(1)).attention_mask.sum(),
        free(input_ids=ids, pixel_values=images(1), **override).attention_mask.sum(),
    )


# --- decoding ---------------------------------------------------------------------------------------------


def favour_the_placeholder(model: SetokimForConditionalGeneration) -> None:
    """Make `<image>` the LM head's top choice after every token (a bias of 100 on its logit)."""
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()[IMAGE_TOKEN_ID] = 100.0
    model.set_output_embeddings(head)


@pytest.mark.parametrize("with_image", [False, True])
def test_text_generation_never_writes_the_placeholder(
    model: SetokimForConditionalGeneration, with_image: bool
) -> None:
    favour_the_placeholder(model)
    inputs = (
        dict(input_ids=torch.tensor([[1, *IMAGE, 5]]), pixel_values=images(1))
        if with_image
        else dict(input_ids=torch.tensor([[1, 5, 6]]))
    )
    with torch.no_grad():
        logits = model(**inputs).logits[:, -1]
    assert int(logits.argmax()) == IMAGE_TOKEN_ID  # unconstrained, the head would write it
    generated = greedy(model, **inputs)[:, inputs["input_ids"].shape[1] :]
    assert IMAGE_TOKEN_ID not in generated
    assert int(generated[0, 0]) == int(logits.index_fill(-1, torch.tensor([IMAGE_TOKEN_ID]), -torch.inf).argmax())


class RecordingStreamer(BaseStreamer):
    def __init__(self) -> None:
        self.values: list[torch.Tensor] = []

    def put(self, value: torch.Tensor) -> None:
        self.values.append(value.clone())

    def end(self) -> None:
        self.values.append(None)


def test_streamer_sees_the_callers_prompt_then_the_new_tokens(model: SetokimForConditionalGeneration) -> None:
    ids = torch.tensor([[1, 5, *IMAGE, 6]])
    streamer = RecordingStreamer()
    generated = model.generate(ids, images(1), max_new_tokens=4, do_sample=False, streamer=streamer)
    assert torch.equal(streamer.values[0].reshape(ids.shape), ids)
    assert torch.equal(torch.cat([v.reshape(-1) for v in streamer.values[1:-1]]), generated[0, ids.shape[1] :])
    assert streamer.values[-1] is None


# --- multi-turn chat on the cache -------------------------------------------------------------------------


@pytest.mark.parametrize("second_turn_image", [False, True], ids=["one image", "two images"])
def test_second_turn_from_the_first_turns_cache_equals_a_fresh_call(
    model: SetokimForConditionalGeneration, second_turn_image: bool
) -> None:
    first = model.generate(
        torch.tensor([[1, 5, *IMAGE, 6, 7]]),
        images(1),
        max_new_tokens=5,
        do_sample=False,
        return_dict_in_generate=True,
    )
    new_turn = [9, *IMAGE, 10, 11] if second_turn_image else [9, 10, 11]
    conversation = torch.cat([first.sequences, torch.tensor([new_turn])], dim=1)
    # the second image unlike the first, so filling its positions with the first image's tokens would show
    pixels = torch.cat([images(1), -images(1, seed=1).abs()]) if second_turn_image else images(1)
    continued = greedy(model, input_ids=conversation, pixel_values=pixels, past_key_values=first.past_key_values)
    fresh = greedy(model, input_ids=conversation, pixel_values=pixels)
    assert torch.equal(continued, fresh)
    assert continued.shape[1] == conversation.shape[1] + 6


def test_cache_continuation_that_cannot_line_up_raises(model: SetokimForConditionalGeneration) -> None:
    ids, mask = left_padded_batch()
    first = model.generate(ids, images(3), attention_mask=mask, max_new_tokens=2, return_dict_in_generate=True)
    with pytest.raises(ValueError, match="one conversation at a time"):
        model.generate(first.sequences, images(3), max_new_tokens=2, past_key_values=first.past_key_values)
    single = model.generate(torch.tensor([[1, *IMAGE, 5]]), images(1), max_new_tokens=3, return_dict_in_generate=True)
    with pytest.raises(ValueError, match="must repeat the earlier turns"):
        model.generate(
            torch.tensor([[1, *IMAGE]]), images(1), max_new_tokens=2, past_key_values=single.past_key_values
        )


def test_static_cache_equals_dynamic_cache(model: SetokimForConditionalGeneration) -> None:
    ids, mask = left_padded_batch()
    dynamic = greedy(model, input_ids=ids, attention_mask=mask, pixel_values=images(3))
    static = greedy(model, input_ids=ids, attention_mask=mask, pixel_values=images(3), cache_implementation="static")
    assert torch.equal(static, dynamic)


# --- attention implementations ----------------------------------------------------------------------------


def test_eager_and_sdpa_agree_on_the_merger_and_the_whole_model() -> None:
    sdpa, eager = setokim(), setokim()
    eager.set_attn_implementation("eager")
    assert eager.model.setok.config._attn_implementation == "eager"
    assert sdpa.model.setok.config._attn_implementation == "sdpa"
    ids, mask = left_padded_batch()
    with torch.no_grad():
        tokens_sdpa, tokens_eager = sdpa.model.setok(images(3)), eager.model.setok(images(3))
        torch.testing.assert_close(tokens_eager.tokens, tokens_sdpa.tokens, atol=1e-5, rtol=1e-5)
        out_sdpa = sdpa(input_ids=ids, attention_mask=mask, pixel_values=images(3))
        out_eager = eager(input_ids=ids, attention_mask=mask, pixel_values=images(3))
    attended = out_sdpa.attention_mask.bool()  # padding positions attend to nothing: kernels differ there
    torch.testing.assert_close(out_eager.logits[attended], out_sdpa.logits[attended], atol=1e-5, rtol=1e-5)


def test_eager_merger_returns_attention_restricted_to_each_cluster() -> None:
    torch.manual_seed(0)
    setok = SetokModel(tiny_setok_config(cluster_threshold=0.05)).eval()
    setok.set_attn_implementation("eager")
    with torch.no_grad():
        out = setok(images(2), output_attentions=True)
    inner_layers = setok.config.inner_layers
    assert len(out.merger_attentions) == inner_layers + setok.config.inter_layers
    same_cluster = out.assignment[:, :, None] == out.assignment[:, None, :]
    for weights in out.merger_attentions[:inner_layers]:
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
        assert float(weights.masked_select(~same_cluster[:, None]).abs().max()) == 0.0
        assert float(weights.masked_select(same_cluster[:, None]).min()) > 0.0
    for weights in out.merger_attentions[inner_layers:]:
        padding = ~out.token_mask[:, None, None, :]
        assert float((weights * padding).abs().sum()) == 0.0


def test_attentions_are_the_encoders_and_the_merger_has_its_own() -> None:
    """`attentions` are the vision encoder's, one per layer, as its own forward gives them; asking for them runs
    the whole encoder but leaves the tokens as they are."""
    torch.manual_seed(0)
    setok = SetokModel(tiny_setok_config(cluster_threshold=0.05, vision_feature_layer=-2)).eval()
    setok.set_attn_implementation("eager")
    pixel_values = images(2)
    with torch.no_grad():
        plain = setok(pixel_values)
        out = setok(pixel_values, output_attentions=True)
        encoder = setok.vision_model(pixel_values=pixel_values, output_attentions=True)
        features = SetokimModel(tiny_setokim_config(setok_config=setok.config)).eval()
        features.setok.load_state_dict(setok.state_dict())
        features.set_attn_implementation("eager")
        image_features = features.get_image_features(pixel_values, output_attentions=True)
    assert plain.attentions is None and plain.merger_attentions is None
    assert len(out.attentions) == setok.config.vision_config.num_hidden_layers
    for ours, reference in zip(out.attentions, encoder.attentions, strict=True):
        torch.testing.assert_close(ours, reference, atol=0, rtol=0)
    torch.testing.assert_close(out.tokens, plain.tokens, atol=0, rtol=0)
    assert len(out.merger_attentions) == setok.config.inner_layers + setok.config.inter_layers
    for ours, reference in zip(image_features.attentions, encoder.attentions, strict=True):
        torch.testing.assert_close(ours, reference, atol=0, rtol=0)
    for ours, reference in zip(image_features.merger_attentions, out.merger_attentions, strict=True):
        torch.testing.assert_close(ours, reference, atol=0, rtol=0)


def test_a_placeholder_embedding_shared_with_its_wrappers_is_refused(model: SetokimForConditionalGeneration) -> None:
    with torch.no_grad():
        weight = model.get_input_embeddings().weight
        weight[IMAGE_START_ID] = weight[IMAGE_TOKEN_ID]
    embeds = model.get_input_embeddings()(torch.tensor([[1, *IMAGE, 5]])).detach()
    with pytest.raises(ValueError, match="cannot be found in inputs_embeds; pass input_ids"):
        model(inputs_embeds=embeds, pixel_values=images(1))
