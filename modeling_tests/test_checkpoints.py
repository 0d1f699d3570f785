"""Folders the documented recipes leave behind load for inference: Trainer checkpoints carry the processor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from conftest import setokim_for
from transformers import AutoModelForImageTextToText, AutoProcessor, Trainer, TrainingArguments

from transformers_setok import SetokimProcessor
from transformers_setok.training import SetokimDataCollator, set_trainable

EXAMPLES = [
    {
        "images": [np.random.default_rng(seed).integers(0, 256, (48, 40, 3), dtype=np.uint8)],
        "conversations": [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": answer}],
    }
    for seed, answer in enumerate(["A red car.", "Two cats."])
]


def test_trainer_checkpoint_reloads_with_auto_processor(tiny_processor: SetokimProcessor, tmp_path: Path) -> None:
    tiny_processor.tokenizer.padding_side = "right"
    model = setokim_for(tiny_processor)
    set_trainable(model)
    args = TrainingArguments(  # docs/finetuning.md's recipe, saving a checkpoint after the first step
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=2,
        max_steps=1,
        learning_rate=1e-2,
        save_strategy="steps",
        save_steps=1,
        remove_unused_columns=False,
        prediction_loss_only=True,
        report_to=[],
        use_cpu=True,
    )
    collator = SetokimDataCollator(tiny_processor)
    trainer = Trainer(
        model=model, args=args, train_dataset=EXAMPLES, data_collator=collator, processing_class=tiny_processor
    )
    trainer.train()

    checkpoint = tmp_path / "run" / "checkpoint-1"
    processor = AutoProcessor.from_pretrained(checkpoint)
    reloaded = AutoModelForImageTextToText.from_pretrained(checkpoint).eval()
    assert isinstance(processor, SetokimProcessor) and (checkpoint / "README.md").is_file()
    batch = SetokimDataCollator(processor)(EXAMPLES)
    expected = collator(EXAMPLES)
    assert all(torch.equal(batch[key], expected[key]) for key in expected)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model.eval()(**batch).logits)
