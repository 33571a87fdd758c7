"""The machine a result was measured on, named the same way in every table and benchmark:
timings (and, for the offline demo teacher, even accuracies) only compare on the same CPU type."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (e.g. "AMD EPYC"), else what platform knows."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.processor() or "unknown CPU")


def accelerator() -> str:
    """The first CUDA device's name, or "no GPU" (torch imported only here, when asked)."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"


def machine() -> str:
    """One line for a result table's footer: cores, CPU, accelerator, torch."""
    import torch

    return f"{os.cpu_count()} cores, {cpu_model()}, {accelerator()}, torch {torch.__version__}"
