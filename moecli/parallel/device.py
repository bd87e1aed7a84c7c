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

from moecli.errors import UserError

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
    with swap is slow but runs), or None where unknown. Inside a memory cgroup with a limit (a container, a
    job scheduler's slot), no more than that limit's headroom plus the free swap (cgroup_headroom)."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        swap = int(fields.get("SwapFree", "0 kB").split()[0]) * 1024
        avail = int(fields["MemAvailable"].split()[0]) * 1024 + swap
    except (OSError, ValueError, IndexError, KeyError):
        return None
    cgroup = cgroup_headroom()
    # the cgroup's own swap limit is not read: counting all free swap can only let a model through
    return avail if cgroup is None else min(avail, cgroup + swap)


# per cgroup version: the limit's file, the usage's file, and the memory.stat key of the page cache that the
# kernel reclaims before it kills (counted as free, as MemAvailable counts it)
_CGROUP_FILES = {2: ("memory.max", "memory.current", "inactive_file"),
                 1: ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")}


def cgroup_headroom(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes of memory this process's cgroup still allows (limit - usage + reclaimable page cache), the least
    over its cgroup and that cgroup's ancestors, for cgroup v2 (at ``root`` or ``root/unified``) and v1
    (``root/memory``); None where no limit is set or none can be read. A container usually sees its own
    cgroup as "/", the root of the hierarchy mounted in it, where its limit is."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    least = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3 or ".." in parts[2]:
            continue
        if parts[0] == "0" and parts[1] == "":
            version, base = 2, root if (root / "cgroup.controllers").exists() else root / "unified"
        elif "memory" in parts[1].split(","):
            version, base = 1, root / "memory"
        else:
            continue
        d = base / parts[2].strip("/")
        while True:
            room = _cgroup_room(d, *_CGROUP_FILES[version])
            if room is not None:
                least = room if least is None else min(least, room)
            if d == base:
                break
            d = d.parent
    return least


def _cgroup_room(d: Path, limit_file: str, usage_file: str, reclaimable_key: str) -> int | None:
    """One cgroup directory's headroom, or None: no limit ("max", or v1's near-2^63 "unlimited"), or unreadable."""
    try:
        limit = (d / limit_file).read_text().strip()
        if limit == "max" or int(limit) >= 2**60:
            return None
        usage = int((d / usage_file).read_text())
        stat = dict(line.split()[:2] for line in (d / "memory.stat").read_text().splitlines() if " " in line)
        return max(0, int(limit) - usage + int(stat.get(reclaimable_key, 0)))
    except (OSError, ValueError):
        return None


def check_fits(num_bytes: int, what: str, hint: str) -> None:
    """Refuse (bad input) work whose memory is known up front to exceed what the machine has, before it is
    started: the kernel would otherwise kill the process part-way, with no message."""
    avail = available_memory()
    if avail is not None and num_bytes > avail:
        raise UserError(f"{what}: {num_bytes / 2**30:,.1f} GiB of memory needed, {avail / 2**30:,.1f} GiB "
                        f"available to this process; {hint}")


# glibc's malloc serves allocations below its mmap threshold from its heap, and raises that threshold (up to 32 MiB)
# to the size of each mmap'd block freed: after the first steps, training's activations and gradients (MBs each)
# all come from the heap, where freed blocks stay with the process for reuse, fragmented. Fixing the threshold at
# 1 MiB returns every block that size or larger to the system when it is freed, at the cost of faulting its pages in
# again on the next use. Measured on a 692M-parameter MoE (benchmarks/train_real_shape.py, fp32, 2 cores), with
# gradients freed each step: peak RSS 11.5 GiB and 61 tokens/s with it; 13.5 GiB and about 80 tokens/s without.
# So training uses it only when memory is short (train.LEAN_ABOVE); otherwise it keeps its gradients (faster).
MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def return_freed_memory() -> bool:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD so large freed tensors go back to the system at once (see
    above), for the rest of the process; False where the C library is not glibc (nothing changes).
    MALLOC_MMAP_THRESHOLD_ in the environment, a user's own choice, is left alone."""
    import ctypes
    import ctypes.util
    import os

    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False
