"""Two processes on the stock `Trainer` (gloo, CPU) take the same step as one process on the same global batch.

The contrastive loss gathers tokens and phrases from both processes with gradients, so the split batch still
contrasts every image against every phrase; DDP averages the gradients.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "pretraining_step.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_step(launcher: list[str], out: Path, per_device_batch: int) -> dict:
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [*launcher, str(SCRIPT), str(out), str(per_device_batch)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(out / "step.pt", weights_only=True)


LAUNCHERS = {
    "torchrun": lambda: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                         "--master_port", str(free_port())],
    "accelerate": lambda: [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "--main_process_port", str(free_port())],
}  # fmt: skip


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_step([sys.executable], tmp_path_factory.mktemp("one") / "out", per_device_batch=4)


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_two_processes_match_one_process_on_the_global_batch(launcher, one_process, tmp_path: Path) -> None:
    two = run_step(LAUNCHERS[launcher](), tmp_path / "out", per_device_batch=2)
    assert (one_process["world_size"], two["world_size"]) == (1, 2)
    torch.testing.assert_close(two["loss"], one_process["loss"], atol=1e-5, rtol=0)
    assert two["weights"].keys() == one_process["weights"].keys()
    for name, weight in one_process["weights"].items():
        torch.testing.assert_close(two["weights"][name], weight, atol=1e-5, rtol=0, msg=name)
