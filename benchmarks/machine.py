"""What the benchmark numbers were taken on: hardware, software versions and background load."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch
import transformers


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (or what `platform` knows)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def cpu_bf16_flags() -> list[str]:
    """The CPU's bf16 instruction-set flags: whether bf16 matmuls have hardware support."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    flags = next((line for line in lines if line.startswith("flags")), "")
    return sorted(flag for flag in flags.split() if "bf16" in flag)


def machine_info() -> dict[str, Any]:
    """Hardware, software versions and the load average when the run started."""
    return {
        "cpu_model": cpu_model(),
        "cpu_bf16_flags": cpu_bf16_flags(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "total_memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "load_average_at_start": os.getloadavg(),
    }
