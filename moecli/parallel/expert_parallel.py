"""Expert parallelism (``--expert-parallel``): each rank holds num_experts / N experts of every MoE layer.

Tokens are routed locally, sent to the rank that holds their expert with all_to_all_single, computed there and
sent back (autograd flows through both exchanges). Expert gradients are then already summed over all ranks'
tokens and are only scaled (``scale_expert_gradients``), not all-reduced. Balance losses use the global batch's
expert loads (collectives.global_mean_load), so the averaged gradient and the logged value equal the
single-process ones.

Shapes: the router's legend (moe/router.py); here also R ranks and El experts per rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from moecli.errors import UserError
from moecli.parallel.launch import DistInfo


def expert_params(model) -> set[int]:
    """ids of the routed experts' parameters (under expert parallelism: this rank's own block of them)."""
    return {id(p) for _, moe in model.moe_layers for p in moe.experts.parameters()}


@torch.no_grad()
def scale_expert_gradients(model, info: DistInfo) -> None:
    """Scale expert-parallel experts' gradients by 1/world (sums over every rank's tokens already, from the
    all-to-all's backward). Every other gradient torch's engine has averaged during the backward: DDP
    (replicate_model) or FSDP2's reduce-scatter (shard_model)."""
    if info.world == 1 or not info.expert_parallel:
        return
    own = expert_params(model)
    for p in model.parameters():
        if id(p) in own:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.div_(info.world)


def shard_experts(model, info: DistInfo) -> None:
    """Keep only this rank's experts (a contiguous block of num_experts / world) in every MoE layer."""
    for _, moe in model.moe_layers:
        E = moe.cfg.num_experts
        if E % info.world:
            raise UserError(f"--expert-parallel: num_experts ({E}) must be divisible by the number of processes "
                            f"({info.world})")
        El = E // info.world
        ex = moe.experts
        for name in ("w1_EDF", "w3_EDF", "w2_EFD") + (("b1_EF", "b3_EF", "b2_ED") if ex.b1_EF is not None else ()):
            full = getattr(ex, name)
            setattr(ex, name, nn.Parameter(full.detach()[info.rank * El:(info.rank + 1) * El].clone()))
        ex.num_experts = El
        moe.ep_world = info.world


def gather_experts(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Concatenate every rank's expert block (dim 0) into the full tensor (on every rank)."""
    parts = [torch.empty_like(tensor) for _ in range(info.world)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with autograd: rows go out in blocks of send_splits (one per rank) and come in as
    blocks of recv_splits; the backward sends the gradients back the same way reversed."""

    @staticmethod
    def forward(ctx, x_ND, send_splits: list[int], recv_splits: list[int]):
        ctx.splits = send_splits, recv_splits
        out = x_ND.new_empty(sum(recv_splits), *x_ND.shape[1:])
        dist.all_to_all_single(out, x_ND.contiguous(), recv_splits, send_splits)
        return out

    @staticmethod
    def backward(ctx, g_ND):
        send_splits, recv_splits = ctx.splits
        return _AllToAll.apply(g_ND, recv_splits, send_splits), None, None


def _regroup(recv_counts_RE: torch.Tensor) -> torch.Tensor:
    """Permutation from (source rank, local expert) block order to (local expert, source rank) order."""
    R, El = recv_counts_RE.shape
    sizes = recv_counts_RE.reshape(-1)
    starts = torch.cumsum(sizes, 0) - sizes  # block starts in (r, j) order
    sizes_jr = recv_counts_RE.t().reshape(-1)
    starts_jr = starts.view(R, El).t().reshape(-1)
    total = int(sizes.sum())
    out_starts = torch.cumsum(sizes_jr, 0) - sizes_jr
    return torch.repeat_interleave(starts_jr - out_starts, sizes_jr, output_size=total) + torch.arange(total)


def expert_parallel_ffn(experts, x_ND: torch.Tensor, counts_E: torch.Tensor, world: int) -> torch.Tensor:
    """Send each token-copy to the rank holding its expert, compute there, send the results back.

    x_ND is sorted by (global) expert, so each destination rank's tokens are one
    contiguous block; counts_E are this rank's kept assignments per global expert.
    """
    E = counts_E.numel()
    El = E // world
    counts_RE = counts_E.view(world, El).contiguous()
    recv_RE = torch.empty_like(counts_RE)
    dist.all_to_all_single(recv_RE, counts_RE)  # recv_RE[r, j]: copies rank r sends to my expert j
    send_splits = counts_RE.sum(1).tolist()
    recv_splits = recv_RE.sum(1).tolist()
    x_recv = _AllToAll.apply(x_ND, send_splits, recv_splits)
    perm = _regroup(recv_RE)
    y_local = experts(x_recv.index_select(0, perm), recv_RE.sum(0))
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    y_recv = y_local.index_select(0, inv)
    return _AllToAll.apply(y_recv, recv_splits, send_splits)
