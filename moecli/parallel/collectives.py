"""Collectives that also work in one process (then each is the identity): what a training step reduces over
the ranks, the values it logs and the stop signal."""

from __future__ import annotations

import torch
import torch.distributed as dist


def _joined() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_mean(x: float) -> float:
    if not _joined():
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def all_max(x: int) -> int:
    """The largest of every rank's x (x itself in one process)."""
    if not _joined():
        return x
    t = torch.tensor([x], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def all_sum_(t: torch.Tensor) -> torch.Tensor:
    if _joined():
        dist.all_reduce(t)
    return t


def global_mean_load(load_E: torch.Tensor) -> torch.Tensor:
    """Per-rank mean of the expert loads over all ranks (no gradient flows through counts).

    With equal micro-batches, f_i from this mean is the global batch's fraction, and the
    all-reduce-averaged gradient of E*sum_i f_i*P_i(local) is that of the global-batch loss.
    """
    load = load_E.detach().float().clone()
    dist.all_reduce(load)
    return load / dist.get_world_size()


def all_gather_int(x: int) -> list[int]:
    """Every rank's x, in rank order ([x] in one process)."""
    if not _joined():
        return [x]
    parts = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, torch.tensor([x], dtype=torch.int64))
    return [int(p) for p in parts]


def barrier() -> None:
    if _joined():
        dist.barrier()
