"""Referring segmentation: the mask decoder, segment(), masks at each image's own size, token masks, training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    IMAGE_END_ID,
    IMAGE_START_ID,
    IMAGE_TOKEN_ID,
    setokim_for,
    tiny_setok_config,
    tiny_setokim_config,
    train_briefly,
)
from conftest import random_pixel_values as images
from huggingface_hub.errors import StrictDataclassError
from PIL import Image, ImageDraw
from torch import nn

from transformers_setok import SetokimDataCollator, SetokimForConditionalGeneration, set_trainable
from transformers_setok.modeling_mask_decoder import mask_loss

IMAGE = [IMAGE_START_ID, IMAGE_TOKEN_ID, IMAGE_END_ID]
DECODER = dict(hidden_size=16, num_layers=1, num_attention_heads=2, upscale=4)


def segmenting_model(**overrides) -> SetokimForConditionalGeneration:
    config = tiny_setokim_config(vision_output_head=True, mask_decoder_config=DECODER, **overrides)
    torch.manual_seed(0)
    return SetokimForConditionalGeneration(config).eval()


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum()) / max(float((a | b).sum()), 1.0)


def test_masks_come_back_at_each_images_own_size(tiny_processor) -> None:
    sizes = [(48, 80), (90, 30), (64, 64)]  # (height, width): wide, tall, square
    regions = []
    logits = torch.full((3, 32, 32), -10.0)
    for index, (height, width) in enumerate(sizes):
        region = torch.zeros(height, width, dtype=torch.bool)
        region[height // 4 : 3 * height // 4, width // 5 : 3 * width // 5] = True  # a known object
        regions.append(region)
        # the decoder's frame: each of its 32x32 cells is as sure as the share of the object it covers
        coverage = nn.functional.interpolate(region[None, None].float(), size=(32, 32), mode="area")[0, 0]
        logits[index] = torch.logit(coverage.clamp(1e-4, 1 - 1e-4))
    masks = tiny_processor.post_process_masks(logits, target_sizes=sizes)
    for mask, region, size in zip(masks, regions, sizes):
        assert mask.shape == size and mask.dtype == torch.bool
        assert iou(mask, region) >= 0.95
    with pytest.raises(ValueError, match="target_sizes must hold one"):
        tiny_processor.post_process_masks(logits, target_sizes=sizes[:2])


def test_token_masks_partition_each_image(tiny_processor) -> None:
    model = segmenting_model()
    with torch.no_grad():
        out = model.model.setok(images(2))
    sizes = [(50, 70), (64, 40)]
    masks = tiny_processor.token_masks(out, target_sizes=sizes)
    for mask, count, size in zip(masks, out.num_tokens.tolist(), sizes):
        assert mask.shape == (count, *size)
        assert torch.equal(mask.sum(dim=0), torch.ones(size, dtype=torch.long))  # every pixel in exactly one token
        assert bool(mask.flatten(1).any(dim=1).all())  # and every token covers some pixel
    with pytest.raises(ValueError, match="target_sizes"):
        tiny_processor.token_masks(out, target_sizes=sizes[:1])


def test_mask_loss_equals_bce_plus_dice_by_hand() -> None:
    logits = torch.tensor([[[2.0, -1.0], [0.5, -3.0]]])
    target = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    total, bce, dice = mask_loss(logits, target, bce_weight=2.0, dice_weight=0.5)
    p = torch.sigmoid(logits)
    by_hand_bce = -(target * p.log() + (1 - target) * (1 - p).log()).mean()
    by_hand_dice = 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
    torch.testing.assert_close(bce, by_hand_bce)
    torch.testing.assert_close(dice, by_hand_dice)
    torch.testing.assert_close(total, 2.0 * by_hand_bce + 0.5 * by_hand_dice)


class TextThenRegion(nn.Module):
    """An LM head that, while text is generated, opens an image in the rows `opens` says and ends the others with
    EOS; while vision tokens are written it closes every region after one token."""

    def __init__(self, head: nn.Linear, opens: list[bool]) -> None:
        super().__init__()
        self.head, self.opens = head, opens

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden).clone()
        if hidden.dim() == 3:  # a text step of generate
            for row, opens in enumerate(self.opens):
                logits[row, ..., IMAGE_START_ID if opens else 2] = 1e4
        else:  # a step of the vision-token loop
            logits[:, IMAGE_END_ID] = 1e4
        return logits


def test_segment_batches_and_says_where_no_region_was_written() -> None:
    model = segmenting_model()
    head = model.get_output_embeddings()
    model.lm_head = TextThenRegion(head, opens=[False, True])
    ids = torch.tensor([[1, *IMAGE, 5, 6], [1, *IMAGE, 7, 8]])
    out = model.segment(ids, images(2), max_new_tokens=2)
    assert out.mask_logits.shape == (2, 32, 32)  # finer than the 8x8 patch grid
    assert out.region_found.tolist() == [False, True]
    assert float(out.mask_logits[0].max()) == torch.finfo(out.mask_logits.dtype).min
    assert out.num_tokens.tolist() == [1, 1]

    model.lm_head = TextThenRegion(head, opens=[True])
    alone = model.segment(ids[1:], images(2)[1:], max_new_tokens=2)
    torch.testing.assert_close(alone.mask_logits[0], out.mask_logits[1], atol=1e-5, rtol=1e-5)


def test_bad_input_gets_clear_errors(tiny_processor) -> None:
    torch.manual_seed(0)
    plain = SetokimForConditionalGeneration(tiny_setokim_config(vision_output_head=True)).eval()
    with pytest.raises(ValueError, match="no mask decoder"):
        plain.segment(torch.tensor([[1, *IMAGE]]), images(1))
    with pytest.raises(StrictDataclassError, match="mask_decoder_config needs vision_output_head=True"):
        tiny_setokim_config(mask_decoder_config=DECODER)
    model = segmenting_model()
    with pytest.raises(ValueError, match="hold no image to segment in"):
        model.segment(torch.tensor([[1, *IMAGE, 5], [1, 5, 6, 7, 8]]), images(1))
    collator = SetokimDataCollator(tiny_processor)
    scene = Image.new("RGB", (64, 64), "white")
    with pytest.raises(ValueError, match=r"`mask` is \(10, 10\) but its image is \(64, 64\)"):
        collator([referring_example(scene, "red", np.zeros((10, 10), bool))])


def referring_scene() -> tuple[Image.Image, dict[str, np.ndarray]]:
    """A red square on the left and a blue disc on the right, on white, with each object's mask."""
    scene = Image.new("RGB", (64, 64), "white")
    draw = ImageDraw.Draw(scene)
    draw.rectangle([4, 20, 27, 43], fill=(220, 20, 20))
    draw.ellipse([36, 16, 59, 39], fill=(20, 40, 220))
    pixels = np.asarray(scene).astype(int)
    return scene, {
        "red": (pixels[..., 0] > 150) & (pixels[..., 2] < 100),
        "blue": (pixels[..., 2] > 150) & (pixels[..., 0] < 100),
    }


def referring_example(scene: Image.Image, colour: str, mask: np.ndarray) -> dict:
    prompt = {"red": "Segment the red square.", "blue": "Segment the blue circle."}[colour]
    content = [{"type": "image"}, {"type": "text", "text": prompt}]
    return {"messages": [{"role": "user", "content": content}], "images": [scene], "mask": mask}


def test_collator_appends_the_region_answer_and_the_target_masks(tiny_processor) -> None:
    scene, masks = referring_scene()
    batch = SetokimDataCollator(tiny_processor)(
        [referring_example(scene, "red", masks["red"]), referring_example(scene, "blue", masks["blue"])]
    )
    assert batch["pixel_values"].shape == (4, 3, 64, 64)  # each row: its scene, then its region
    assert batch["target_masks"].shape == (2, 64, 64) and batch["target_mask_rows"].tolist() == [True, True]
    torch.testing.assert_close(batch["target_masks"][0], torch.from_numpy(masks["red"]).float())
    labelled = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert labelled[-4:-1] == [
        tiny_processor.image_start_token_id,
        tiny_processor.image_token_id,
        tiny_processor.image_end_token_id,
    ]  # the answer is the region image
    region = batch["pixel_values"][1]
    outside = ~torch.from_numpy(masks["red"])
    torch.testing.assert_close(
        region[:, outside], torch.full_like(region[:, outside], 128 / 255 * 2 - 1), atol=0.02, rtol=0
    )  # grey outside the mask


def test_trainer_learns_to_segment_the_referred_object(tiny_processor, tmp_path: Path) -> None:
    model = setokim_for(
        tiny_processor,
        vision_output_head=True,
        mask_decoder_config=DECODER,
        setok_config=tiny_setok_config(cluster_threshold=0.5),  # a few tokens per region
    )
    scene, masks = referring_scene()
    examples = [referring_example(scene, colour, masks[colour]) for colour in ("red", "blue")]
    collator = SetokimDataCollator(tiny_processor, mask_size=(32, 32))
    with torch.no_grad():
        before = model(**collator(examples)).mask_loss.item()
    set_trainable(model, merger=False)
    train_briefly(model, collator, examples, tmp_path, max_steps=100, learning_rate=1e-2)
    with torch.no_grad():
        after = model(**collator(examples)).mask_loss.item()
    assert after < 0.5 * before

    prompts = [
        tiny_processor.apply_chat_template(example["messages"], add_generation_prompt=True) for example in examples
    ]
    inputs = tiny_processor(images=[scene, scene], text=prompts, return_tensors="pt", padding=True)
    out = model.segment(
        inputs["input_ids"], inputs["pixel_values"], attention_mask=inputs["attention_mask"], max_new_tokens=3
    )
    predicted = tiny_processor.post_process_masks(out, target_sizes=[(64, 64), (64, 64)])
    for mask, colour in zip(predicted, ("red", "blue")):
        target = torch.from_numpy(masks[colour])
        background_iou = iou(torch.zeros_like(target), target)  # an all-background answer
        assert iou(mask, target) > max(background_iou, 0.5)


def test_a_batch_mixing_referring_and_drawing_rows_segments_only_the_referring_ones(tiny_processor) -> None:
    """Instruction data mixes tasks: a drawing row (no image to read) beside a referring row gets no mask loss."""
    scene, masks = referring_scene()
    drawing = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Draw a red square."}]},
            {"role": "assistant", "content": [{"type": "image"}]},
        ],
        "images": [scene],
    }
    model = setokim_for(tiny_processor, vision_output_head=True, mask_decoder_config=DECODER)
    collator = SetokimDataCollator(tiny_processor, mask_size=(32, 32))
    mixed = collator([referring_example(scene, "red", masks["red"]), drawing])
    assert mixed["target_mask_rows"].tolist() == [True, False]
    with torch.no_grad():
        both = model(**mixed)
        alone = model(**collator([referring_example(scene, "red", masks["red"])]))
    torch.testing.assert_close(both.mask_logits, alone.mask_logits)
    torch.testing.assert_close(both.mask_loss, alone.mask_loss)
