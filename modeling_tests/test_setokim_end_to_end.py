"""Setokim as users meet it: chat template -> processor -> generate, streamers, pipelines, parts, Hub folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize_weights, run_without_plugin, setokim_for, tiny_setok_config
from PIL import Image
from transformers import (
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    SiglipConfig,
    SiglipModel,
    SiglipVisionModel,
    TextStreamer,
    pipeline,
)

from transformers_setok import SetokimForConditionalGeneration, SetokimModel, SetokimProcessor, SetokModel

QUESTION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]


def picture(seed: int) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((48, 40, 3)) * 255).astype(np.uint8))


@pytest.fixture
def chat_model(tiny_processor: SetokimProcessor) -> SetokimForConditionalGeneration:
    return setokim_for(tiny_processor)


def test_readme_chat_example_and_batch_decode(chat_model, tiny_processor: SetokimProcessor) -> None:
    prompt = tiny_processor.apply_chat_template(QUESTION, add_generation_prompt=True)
    assert prompt == "USER: <image>\nWhat is in the picture? ASSISTANT:"
    inputs = tiny_processor(images=[picture(0)], text=[prompt], return_tensors="pt")
    out = chat_model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    answer = tiny_processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    expected = tiny_processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answer == [expected]


def test_processor_batch_generates_like_single_prompts(chat_model, tiny_processor: SetokimProcessor) -> None:
    prompts = [
        tiny_processor.apply_chat_template(QUESTION, add_generation_prompt=True),
        "USER: Describe both. <image> and <image> please, in detail ASSISTANT:",
    ]
    images = [picture(1), picture(2), picture(3)]
    batch = tiny_processor(images=images, text=prompts, return_tensors="pt", padding=True)
    together = chat_model.generate(**batch, max_new_tokens=5, do_sample=False)
    width = batch["input_ids"].shape[1]
    for row, row_images in enumerate([images[:1], images[1:]]):
        alone = tiny_processor(images=row_images, text=[prompts[row]], return_tensors="pt")
        single = chat_model.generate(**alone, max_new_tokens=5, do_sample=False)
        assert torch.equal(together[row, width:], single[0, alone["input_ids"].shape[1] :])


def test_text_streamer_prints_the_answer(chat_model, tiny_processor: SetokimProcessor, capsys) -> None:
    prompt = tiny_processor.apply_chat_template(QUESTION, add_generation_prompt=True)
    inputs = tiny_processor(images=[picture(0)], text=[prompt], return_tensors="pt")
    streamer = TextStreamer(tiny_processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    out = chat_model.generate(**inputs, max_new_tokens=8, do_sample=False, streamer=streamer)
    answer = tiny_processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert capsys.readouterr().out.strip() == answer.strip()


def test_image_text_to_text_pipeline(chat_model, tiny_processor: SetokimProcessor) -> None:
    answerer = pipeline("image-text-to-text", model=chat_model, processor=tiny_processor)
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": picture(0)}, {"type": "text", "text": "What is in the picture?"}],
        }
    ]
    result = answerer(text=messages, max_new_tokens=6, do_sample=False, return_full_text=False)
    prompt = tiny_processor.apply_chat_template(QUESTION, add_generation_prompt=True)
    inputs = tiny_processor(images=[picture(0)], text=[prompt], return_tensors="pt")
    direct = chat_model.generate(**inputs, max_new_tokens=6, do_sample=False)
    expected = tiny_processor.decode(direct[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert result[0]["generated_text"] == expected


def save_checkpoint(model: SetokimForConditionalGeneration, processor: SetokimProcessor, folder: Path) -> None:
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def assert_same_answers(
    reloaded: SetokimForConditionalGeneration, model: SetokimForConditionalGeneration, processor: SetokimProcessor
) -> None:
    """Same logits and the same greedy tokens for a batch of two pictures."""
    prompt = processor.apply_chat_template(QUESTION, add_generation_prompt=True)
    inputs = processor(images=[picture(0), picture(1)], text=[prompt, prompt], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)
    expected = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(reloaded.generate(**inputs, max_new_tokens=6, do_sample=False), expected)


def test_saved_folder_is_what_the_hub_gets(chat_model, tiny_processor: SetokimProcessor, tmp_path: Path) -> None:
    randomize_weights(chat_model, seed=1)  # biases and norms that a save forgetting them would re-create differently
    save_checkpoint(chat_model, tiny_processor, tmp_path)
    files = {path.name for path in tmp_path.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "processor_config.json"} <= files
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= files
    assert {"modeling_setokim.py", "processing_setokim.py", "configuration_setokim.py", "clustering.py"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_setokim.SetokimConfig",
        "AutoModel": "modeling_setokim.SetokimModel",
        "AutoModelForImageTextToText": "modeling_setokim.SetokimForConditionalGeneration",
    }
    processor_config = json.loads((tmp_path / "processor_config.json").read_text())
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_setokim.SetokimProcessor"

    assert type(AutoProcessor.from_pretrained(tmp_path)) is SetokimProcessor
    assert type(AutoModel.from_pretrained(tmp_path)) is SetokimModel
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert_same_answers(reloaded, chat_model, AutoProcessor.from_pretrained(tmp_path))


REMOTE_SCRIPT = """
import sys
import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

folder = sys.argv[1]
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
assert "transformers_setok" not in sys.modules
image = Image.fromarray((np.random.default_rng(0).random((48, 40, 3)) * 255).astype(np.uint8))
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=[image], text=[prompt], return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
with torch.no_grad():
    torch.save(model(**inputs).logits, sys.argv[2])
print(type(model).__name__, type(processor).__name__, out[0].tolist())
"""


def test_trust_remote_code_generates_without_the_plugin(chat_model, tiny_processor, tmp_path: Path) -> None:
    folder = tmp_path / "setokim"
    randomize_weights(chat_model, seed=2)
    save_checkpoint(chat_model, tiny_processor, folder)
    stdout = run_without_plugin(REMOTE_SCRIPT, str(folder), str(tmp_path / "logits.pt"), workdir=tmp_path)
    name, processor_name, tokens = stdout.strip().splitlines()[-1].split(" ", 2)
    assert (name, processor_name) == ("SetokimForConditionalGeneration", "SetokimProcessor")
    prompt = tiny_processor.apply_chat_template(QUESTION, add_generation_prompt=True)
    inputs = tiny_processor(images=[picture(0)], text=[prompt], return_tensors="pt")
    local = chat_model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert json.loads(tokens) == local[0].tolist()
    with torch.no_grad():
        expected = chat_model(**inputs).logits
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt", weights_only=True), expected, atol=1e-6, rtol=0)


def tiny_llama(tokenizer_dir: Path, folder: Path) -> LlamaForCausalLM:
    """A 2-layer Llama saved with the tiny tokenizer, like a causal LM from the Hub."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(1)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    ).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def vision_parts(folder: Path) -> dict[str, object]:
    """A SeTok folder, a SigLIP vision encoder folder and a SigLIP dual-encoder folder."""
    torch.manual_seed(2)
    setok = SetokModel(tiny_setok_config())
    setok.save_pretrained(folder / "setok")
    encoder = SiglipVisionModel(tiny_setok_config().vision_config)
    encoder.save_pretrained(folder / "siglip_vision")
    dual = SiglipModel(
        SiglipConfig(
            vision_config=tiny_setok_config().vision_config.to_dict(),
            text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        )
    )
    dual.save_pretrained(folder / "siglip")
    return {"setok": setok.vision_model, "siglip_vision": encoder, "siglip": dual.vision_model}


@pytest.mark.parametrize("vision", ["setok", "siglip_vision", "siglip"])
def test_compose_from_pretrained_parts(tiny_tokenizer_dir: Path, tmp_path: Path, vision: str) -> None:
    language_model = tiny_llama(tiny_tokenizer_dir, tmp_path / "llm")
    encoders = vision_parts(tmp_path)
    kwargs = {} if vision == "setok" else dict(num_attention_heads=2, intermediate_size=64, token_size=24)
    model, processor = SetokimForConditionalGeneration.from_parts(
        str(tmp_path / vision), str(tmp_path / "llm"), **kwargs
    )
    encoder_weights = encoders[vision].state_dict()
    for name, value in model.model.setok.vision_model.state_dict().items():
        assert torch.equal(value, encoder_weights[name]), name

    old_vocab = language_model.config.vocab_size
    assert model.config.text_config.vocab_size == len(processor.tokenizer) == old_vocab + 3
    embeddings = model.get_input_embeddings().weight
    mean = language_model.get_input_embeddings().weight.mean(dim=0)
    image_ids = (processor.image_token_id, processor.image_start_token_id, processor.image_end_token_id)
    for token_id in image_ids:
        assert token_id >= old_vocab
        torch.testing.assert_close(embeddings[token_id], mean, atol=1e-4, rtol=0)  # the mean, a tiny offset apart
    assert len({tuple(embeddings[token_id].tolist()) for token_id in image_ids}) == 3  # <image> stays findable
    ids = processor.tokenizer(["a photo of a lake"], return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits[..., :old_vocab], language_model(input_ids=ids).logits)

    randomize_weights(model, seed=3)  # as after training: the composed model is saved with non-trivial weights
    save_checkpoint(model, processor, tmp_path / "composed")
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "composed").eval()
    reprocessor = AutoProcessor.from_pretrained(tmp_path / "composed")
    reprocessor.tokenizer.padding_side = "left"
    assert_same_answers(reloaded, model, reprocessor)


def test_compose_needs_a_tokenizer_for_a_model_object(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    language_model = tiny_llama(tiny_tokenizer_dir, tmp_path / "llm")
    vision_parts(tmp_path)
    with pytest.raises(ValueError, match="tokenizer is required"):
        SetokimForConditionalGeneration.from_parts(str(tmp_path / "setok"), language_model)
    with pytest.raises(ValueError, match="pretrained SetokModel keeps its config"):
        SetokimForConditionalGeneration.from_parts(str(tmp_path / "setok"), str(tmp_path / "llm"), token_size=8)


def test_compose_in_bfloat16_keeps_one_dtype_through_save_and_load(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    tiny_llama(tiny_tokenizer_dir, tmp_path / "llm")
    vision_parts(tmp_path)
    model, processor = SetokimForConditionalGeneration.from_parts(
        str(tmp_path / "siglip_vision"),
        str(tmp_path / "llm"),
        dtype=torch.bfloat16,
        num_attention_heads=2,
        intermediate_size=64,
        token_size=24,
    )
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    randomize_weights(model, seed=4)
    save_checkpoint(model, processor, tmp_path / "composed")
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "composed", dtype="auto").eval()
    assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}
    processor.tokenizer.padding_side = "left"
    assert_same_answers(reloaded, model, processor)
    with pytest.raises(ValueError, match="not a whole Setokim"):
        SetokimForConditionalGeneration.from_parts(str(tmp_path / "composed"), str(tmp_path / "llm"))
