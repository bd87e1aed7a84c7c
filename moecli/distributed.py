"""Multi-process training on torch.distributed: data parallelism, optionally expert parallelism.

* Launch: ``moe train --nproc N`` spawns N local processes; under ``torchrun`` the
  environment (RANK, WORLD_SIZE, ...) is used as is. The processes train on the CPU
  and talk over gloo, also on a machine with a GPU (nccl takes only GPU tensors).
* Data parallel: every rank takes its slice of the same global batch; gradients
  are averaged with one all-reduce over a flat buffer, so all ranks step alike.
* Expert parallel (``--expert-parallel``): each rank holds num_experts/N experts
  of every MoE layer. Tokens are routed locally, sent to the rank that holds
  their expert with all_to_all_single, computed there and sent back (autograd
  flows through both exchanges). Expert gradients are then already summed over
  all ranks' tokens and are only scaled, not all-reduced.
* Balance losses use the global batch's expert loads (all-reduced counts), so the
  averaged gradient and the logged value equal the single-process ones.

Shape legend: N token-copies sorted by expert, D model dim, R ranks, El experts per rank.
"""

from __future__ import annotations

import inspect
import os
import signal
import socket
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from .device import model_device
from .errors import Interrupted, RunFailed, UserError


# Ranks training on the CPU talk over gloo, also where torch sees a GPU (nccl carries only GPU tensors: choosing
# it there made every collective fail). Ranks on GPUs (--device cuda, one each) use nccl for GPU tensors and gloo
# for the CPU ones (the step's logged values, the stop signal).
BACKEND = "gloo"
GPU_BACKEND = "cpu:gloo,cuda:nccl"


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    expert_parallel: bool = False
    fsdp: bool = False  # --fsdp: parameters, gradients and optimizer state sharded (shard_model)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), getattr(current, "expert_parallel", False),
                        getattr(current, "fsdp", False))
    return DistInfo()


def init_from_env(expert_parallel: bool = False, fsdp: bool = False, cuda: bool = False) -> DistInfo:
    """Join the process group described by RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (torchrun or our spawner);
    ``cuda``: the ranks train on GPUs."""
    if not dist.is_initialized():
        dist.init_process_group(GPU_BACKEND if cuda else BACKEND)
    current.expert_parallel, current.fsdp = expert_parallel, fsdp
    return current()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn, args, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(max(1, torch.get_num_threads() // world))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C reaches the ranks from the launcher, as SIGTERM
    try:
        result = fn(*args)
        if rank == 0:
            queue.put(("ok", result))
    except BaseException as e:  # report the first failure to the parent as (kind, message)
        queue.put(("error", (type(e).__name__, getattr(e, "message", str(e)), getattr(e, "exit_code", 1))))
        # a stop every rank agreed on (Interrupted) ends each rank in turn; a failure ends the others at once
        raise SystemExit(0 if isinstance(e, Interrupted) else 1) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(nproc: int, fn, *args):
    """Run fn(*args) in nproc local processes; returns rank 0's result, re-raises the first failure.

    A Ctrl-C (SIGINT) or SIGTERM to this process is passed on to the ranks as one SIGTERM (they ignore
    SIGINT, so a Ctrl-C at a terminal, which reaches them too, counts once): they finish the step, save it
    and stop, and this process reports the signal it got (``Interrupted``). A second signal ends them at once.
    """
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    context = mp.start_processes(_worker, args=(nproc, free_port(), fn, args, queue), nprocs=nproc,
                                 start_method="spawn", join=False)
    got: list[int] = []

    def handle(signum, frame):
        got.append(signum)
        for p in context.processes:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM if len(got) == 1 else signal.SIGKILL)

    main = threading.current_thread() is threading.main_thread()  # where Python runs signal handlers
    old = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        while not context.join():
            pass
    except (mp.ProcessExitedException, mp.ProcessRaisedException):
        pass  # the failing worker put its error on the queue
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    status = None
    while not queue.empty():
        item = queue.get()
        if item[0] == "error" or status is None:
            status = item
    if got and (status is None or status[0] == "error" and status[1][0] != "Interrupted"):
        raise KeyboardInterrupt  # a second signal ended the ranks before they could save
    if status is None:
        raise RuntimeError("distributed workers ended without a result")
    if status[0] == "error":
        name, msg, code = status[1]
        if name == "Interrupted":  # by name: what the queue carries across processes
            raise Interrupted(msg, got[0] if got else code - 128)
        raise (UserError if code == 2 else RunFailed)(msg)
    return status[1]


# ---------------------------------------------------------------- gradients


def expert_params(model) -> set[int]:
    return {id(p) for _, moe in model.moe_layers for p in moe.experts.parameters()}


@torch.no_grad()
def sync_gradients(model, info: DistInfo) -> None:
    """Scale expert-parallel experts' gradients by 1/world (sums over every rank's tokens already, from the
    all-to-all's backward). Every other gradient torch's engine has averaged during the backward: DDP
    (replicate_model) or FSDP2's reduce-scatter (shard_model)."""
    if info.world == 1 or not info.expert_parallel:
        return
    sharded = expert_params(model)
    for p in model.parameters():
        if id(p) in sharded:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.div_(info.world)


def all_mean(x: float) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def all_max(x: int) -> int:
    """The largest of every rank's x (x itself in one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return x
    t = torch.tensor([x], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def all_sum_(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
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
    if not (dist.is_available() and dist.is_initialized()):
        return [x]
    parts = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, torch.tensor([x], dtype=torch.int64))
    return [int(p) for p in parts]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------- expert parallelism


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


# ---------------------------------------------------------------- FSDP2 (--fsdp)


def is_sharded(t) -> bool:
    """A DTensor: a parameter, gradient or optimizer state FSDP2 shards over the ranks."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (its FSDP shard), or the tensor itself."""
    return t.to_local() if is_sharded(t) else t


def shard_model(model, info: DistInfo) -> None:
    """--fsdp: torch.distributed.fsdp.fully_shard on each block, then on the whole model (embedding, final norm,
    head), over a one-dimensional DeviceMesh of all ranks ("dp"). Each rank keeps 1/world of every parameter and
    of its gradient and optimizer state; a block's parameters are all-gathered for its forward and backward and
    freed after, and gradients are reduce-scattered (averaged) as the backward goes.

    With --expert-parallel the ranks also form the expert-parallel group: each holds its own experts whole
    (shard_experts), which FSDP leaves alone (ignored_params); their gradients are sums over every rank's tokens
    already (the all-to-all's backward) and sync_gradients scales them."""
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
    (ignored_modules); sync_gradients scales them. Buffers are not broadcast: the router biases (aux-free
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
    return t.full_tensor() if is_sharded(t) else t


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
