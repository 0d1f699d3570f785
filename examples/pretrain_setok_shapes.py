"""Stage-1 pretraining of a tiny SeTok (tokenizer + detokenizer + concept head) on generated shapes scenes.

Every scene is a 64x64 picture (sky, a coloured ground strip, one or two coloured circles, squares or triangles)
with its concept phrases ("red circle", "green ground", ...). Phrases are embedded by a 2-layer CLIP text tower
over a word-level vocabulary, so the example needs no downloaded tokenizer. The stock `Trainer` runs it, in one
process or several:

    python examples/pretrain_setok_shapes.py --out setok-shapes/
    torchrun --nproc_per_node 2 examples/pretrain_setok_shapes.py --out setok-shapes/
    setok reconstruct src/transformers_setok/sample_images/shapes.png --model setok-shapes/ --out recon/
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from transformers_setok import SetokForPreTraining, SetokForPreTrainingConfig, SetokImageProcessor

COLOURS = {
    "red": (220, 60, 50),
    "yellow": (245, 190, 50),
    "blue": (60, 100, 220),
    "green": (80, 160, 70),
    "purple": (140, 70, 170),
    "orange": (240, 130, 40),
}
SHAPES = ("circle", "square", "triangle")
VOCABULARY = {word: index for index, word in enumerate(["<pad>", "<bos>", "<eos>", *COLOURS, *SHAPES, "ground"])}
IMAGE_SIZE, PHRASE_LENGTH, MAX_PHRASES = 64, 4, 3


def draw_scene(rng: random.Random) -> tuple[Image.Image, list[str]]:
    """One scene and its phrases: the ground's colour and each shape's colour and kind."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (220, 228, 240))
    draw = ImageDraw.Draw(image)
    ground = rng.choice(list(COLOURS))
    horizon = rng.randint(40, 52)
    draw.rectangle([0, horizon, IMAGE_SIZE, IMAGE_SIZE], fill=COLOURS[ground])
    phrases = [f"{ground} ground"]
    for _ in range(rng.randint(1, 2)):
        colour, shape = rng.choice([c for c in COLOURS if c != ground]), rng.choice(SHAPES)
        size, x, y = rng.randint(14, 24), rng.randint(2, 40), rng.randint(2, horizon - 12)
        box = [x, y, x + size, y + size]
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            draw.rectangle(box, fill=COLOURS[colour])
        else:
            draw.polygon([(x + size // 2, y), (x, y + size), (x + size, y + size)], fill=COLOURS[colour])
        phrases.append(f"{colour} {shape}")
    return image, phrases


def phrase_ids(phrase: str) -> list[int]:
    return [VOCABULARY["<bos>"], *(VOCABULARY[word] for word in phrase.split()), VOCABULARY["<eos>"]]


class ShapesScenes(Dataset):
    """`size` scenes drawn from `seed`, processed for the tokenizer, with their phrases as padded id arrays."""

    def __init__(self, size: int, seed: int, processor: SetokImageProcessor) -> None:
        rng = random.Random(seed)
        self.examples = []
        for _ in range(size):
            image, phrases = draw_scene(rng)
            ids = torch.zeros(MAX_PHRASES, PHRASE_LENGTH, dtype=torch.long)
            for row, phrase in enumerate(phrases):
                ids[row, : len(phrase_ids(phrase))] = torch.tensor(phrase_ids(phrase))
            pixel_values = processor(images=image, return_tensors="pt").pixel_values[0]
            self.examples.append(
                {"pixel_values": pixel_values, "concept_input_ids": ids, "concept_attention_mask": (ids != 0).long()}
            )

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.examples[index]


def tiny_config() -> SetokForPreTrainingConfig:
    """A SigLIP-style 64x64 tokenizer (8x8 patches, trained from scratch) and a 32x32 pixel-space U-Net
    (cross-attention at 16x16 and 8x8 only: attention over 32x32 positions would dominate the CPU time)."""
    return SetokForPreTrainingConfig(
        setok_config=dict(
            vision_config=dict(
                model_type="siglip_vision_model",
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=IMAGE_SIZE,
                patch_size=8,
            ),
            num_attention_heads=2,
            intermediate_size=128,
            token_size=32,
            cluster_threshold=0.5,
            max_tokens=16,
        ),
        detokenizer_config=dict(
            token_size=32,
            unet_config=dict(
                sample_size=32,
                in_channels=3,
                out_channels=3,
                block_out_channels=[16, 32, 64],
                layers_per_block=1,
                down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                cross_attention_dim=64,
                attention_head_dim=8,
                norm_num_groups=4,
            ),
        ),
        text_config=dict(
            model_type="clip_text_model",
            vocab_size=len(VOCABULARY),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=PHRASE_LENGTH,
            pad_token_id=VOCABULARY["<pad>"],
            bos_token_id=VOCABULARY["<bos>"],
            eos_token_id=VOCABULARY["<eos>"],
        ),
        freeze_vision_model=False,  # no pretrained encoder here: it learns with the merger
        freeze_text_model=False,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("setok-shapes"))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=16, help="per process")
    parser.add_argument("--scenes", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    processor = SetokImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    model = SetokForPreTraining(tiny_config())
    training_args = TrainingArguments(
        args.out,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=1e-3,
        warmup_steps=100,
        lr_scheduler_type="cosine",
        logging_steps=50,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=args.seed,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=ShapesScenes(args.scenes, args.seed, processor))
    trainer.train()
    trainer.save_model(args.out)
    if trainer.is_world_process_zero():
        processor.save_pretrained(args.out)


if __name__ == "__main__":
    main()
