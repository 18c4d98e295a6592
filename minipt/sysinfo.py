"""What machine a figure was measured on: the benchmarks write this next to every number."""
from __future__ import annotations

import platform


def device_name(device: str) -> str:
    """The GPU's name for "cuda", else the CPU's model name (from /proc/cpuinfo on Linux)."""
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"
