"""--device: where a command's model computes (train, eval, generate, inspect-routing).

Everything else stays on the CPU: the token caches, the batches until they are sampled, the
samplers' generators, routing statistics and what is saved (safetensors from CPU copies), so
files and seeded draws do not depend on the device. The CPU is the default; ``auto`` takes a
GPU where torch sees one.
"""

from __future__ import annotations

import re

import torch

from .errors import UserError

CHOICES = "cpu, cuda, cuda:N or auto"


def resolve_device(name: str) -> torch.device:
    """--device NAME -> a torch.device: cpu, cuda, cuda:N, or auto (cuda where torch sees a GPU, else cpu).
    A GPU that torch does not see, or any other name, is bad input naming the flag."""
    name = name.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match is None:
        raise UserError(f"--device: expected {CHOICES}, got {name!r}")
    index = match.group(1)
    if not torch.cuda.is_available():
        raise UserError(f"--device {name}: torch sees no CUDA GPU here (torch {torch.__version__}); "
                        "use --device cpu")
    if index and int(index) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA GPU(s), numbered from 0")
    return torch.device(name)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's weights."""
    return next(model.parameters()).device
