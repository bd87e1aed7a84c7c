"""--device: where a command's model computes (train, eval, generate, inspect-routing).

Everything else stays on the CPU: the token caches, the batches until they are sampled, the
samplers' generators, routing statistics and what is saved (safetensors from CPU copies), so
files and seeded draws do not depend on the device. The CPU is the default; ``auto`` takes a
GPU where torch sees one.
"""

from __future__ import annotations

import re
from pathlib import Path

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


def available_memory() -> int | None:
    """Bytes the system can still give, swap included (Linux's MemAvailable + SwapFree: a model that fits only
    with swap is slow but runs), or None where unknown. A container's own limit (cgroup) is not read."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        return (int(fields["MemAvailable"].split()[0]) + int(fields.get("SwapFree", "0 kB").split()[0])) * 1024
    except (OSError, ValueError, IndexError, KeyError):
        return None


def check_fits(num_bytes: int, what: str, hint: str) -> None:
    """Refuse (bad input) work whose memory is known up front to exceed what the machine has, before it is
    started: the kernel would otherwise kill the process part-way, with no message."""
    avail = available_memory()
    if avail is not None and num_bytes > avail:
        raise UserError(f"{what}: {num_bytes / 2**30:,.1f} GiB of memory needed, {avail / 2**30:,.1f} GiB "
                        f"available on this machine; {hint}")
