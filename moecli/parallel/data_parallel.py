"""Data parallelism over the ranks with torch's own engine: DDP (``replicate_model``) by default, FSDP2
(``shard_model``, ``--fsdp``) to shard parameters, gradients and AdamW state. Every rank takes its slice of the
same global batch; torch averages the gradients during the backward. Under FSDP2 a parameter, its gradient and
its optimizer state are DTensors (``is_dtensor``): this rank's shard of the whole."""

from __future__ import annotations

import inspect

import torch

from moecli.parallel.device import model_device
from moecli.parallel.launch import DistInfo


def is_dtensor(t) -> bool:
    """A DTensor: a parameter, gradient or optimizer state FSDP2 shards over the ranks."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (its FSDP shard), or the tensor itself."""
    return t.to_local() if is_dtensor(t) else t


def shard_model(model, info: DistInfo) -> None:
    """--fsdp: torch.distributed.fsdp.fully_shard on each block, then on the whole model (embedding, final norm,
    head), over a one-dimensional DeviceMesh of all ranks ("dp"). Each rank keeps 1/world of every parameter and
    of its gradient and optimizer state; a block's parameters are all-gathered for its forward and backward and
    freed after, and gradients are reduce-scattered (averaged) as the backward goes.

    With --expert-parallel the ranks also form the expert-parallel group: each holds its own experts whole
    (shard_experts), which FSDP leaves alone (ignored_params); their gradients are sums over every rank's tokens
    already (the all-to-all's backward) and expert_parallel.scale_expert_gradients scales them."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(model_device(model).type, (info.world,), mesh_dim_names=("dp",))
    ignored = {p for _, moe in model.moe_layers for p in moe.experts.parameters()} if info.expert_parallel else None
    for block in model.layers:
        fully_shard(block, mesh=mesh, ignored_params=ignored)
    fully_shard(model, mesh=mesh, ignored_params=ignored)


def replicate_model(model, info: DistInfo) -> None:
    """Data parallelism without --fsdp: torch's DDP, applied in place (torch.distributed._composable.replicate,
    so the model stays the module it was): its gradients are all-reduced and averaged in buckets while the
    backward runs. Under --expert-parallel each rank's experts are its own and DDP leaves them out
    (ignored_modules); expert_parallel.scale_expert_gradients scales them. Buffers are not broadcast: the router biases (aux-free
    balancing) are updated from all-reduced loads, the same on every rank."""
    from torch.distributed._composable.replicate import replicate
    from torch.nn.parallel import DistributedDataParallel

    ignored = [moe.experts for _, moe in model.moe_layers] if info.expert_parallel else None
    device = model_device(model)
    kwargs = {"device_ids": [device.index]} if device.type == "cuda" else {}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        kwargs["forward_sync_buffers"] = False  # (torch 2.13 and later; broadcast_buffers before it)
    else:
        kwargs["broadcast_buffers"] = False
    replicate(model, ignored_modules=ignored, **kwargs)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (an all-gather every rank takes part in), or the tensor itself."""
    return t.full_tensor() if is_dtensor(t) else t


def shard_like(full: torch.Tensor, like) -> torch.Tensor:
    """``full`` (the same on every rank) split as the DTensor ``like`` is: this rank's shard, as a DTensor."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=None)


def state_bytes(model, opt) -> int:
    """Bytes of weights, gradients and optimizer state this rank holds (its shards under FSDP)."""
    n = 0
    for p in model.parameters():
        n += local(p).nbytes + (local(p.grad).nbytes if p.grad is not None else 0)
    for s in opt.state.values():
        n += sum(local(v).nbytes for v in s.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    return n
