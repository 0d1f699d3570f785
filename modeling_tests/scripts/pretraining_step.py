"""One stock-`Trainer` SGD step of a tiny `SetokForPreTraining` on a fixed 4-image global batch.

Run alone (one process, the whole batch) or under `torchrun` / `accelerate launch` (the batch split across
processes); writes the step's loss (averaged over processes) and the updated trainable weights to `out/step.pt`.

    python pretraining_step.py OUT PER_DEVICE_BATCH
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # modeling_tests/, for the tiny configs

from pretraining_fixtures import tiny_detokenizer_config, tiny_pretraining_config, toy_examples  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from transformers_setok import SetokForPreTraining  # noqa: E402

GLOBAL_BATCH = 4


def main(out: Path, per_device_batch: int) -> None:
    torch.manual_seed(0)
    config = tiny_pretraining_config(detokenizer_config=tiny_detokenizer_config(condition_drop_prob=0.0))
    model = SetokForPreTraining(config)
    losses = []
    model.register_forward_hook(lambda module, args, output: losses.append(output.loss.detach()))
    args = TrainingArguments(
        out,
        max_steps=1,
        per_device_train_batch_size=per_device_batch,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    Trainer(model=model, args=args, train_dataset=toy_examples()[:GLOBAL_BATCH]).train()

    loss = losses[0]
    if dist.is_initialized():
        dist.all_reduce(loss)
        loss /= dist.get_world_size()
    if args.process_index == 0:
        weights = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        torch.save({"loss": loss, "weights": weights, "world_size": args.world_size}, out / "step.pt")
    if dist.is_initialized():  # a process group left to exit teardown can abort the process (gloo's threads)
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
