"""The optimizer and its schedule: AdamW with a warmup and a decay (train.lr_schedule), gradients kept from step
to step, AdamW's state made before the first step, and gradient clipping over every rank's gradients."""

from __future__ import annotations

import math

import torch

from moecli.model.transformer import Transformer
from moecli.parallel.collectives import all_sum_
from moecli.parallel.data_parallel import is_dtensor, local
from moecli.parallel.expert_parallel import expert_params
from moecli.parallel.launch import DistInfo


def lr_at(step: int, t) -> float:
    """The learning rate of step `step` (0-based) under train.lr_schedule: a linear warmup, then cosine,
    linear, wsd (constant, then linear over the last decay_fraction of the steps) or constant."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.lr_schedule == "constant":
        return t.lr
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))  # 0 -> 1 after warmup
    if t.lr_schedule == "wsd":
        progress = max(0.0, progress - (1 - t.decay_fraction)) / t.decay_fraction
    left = 0.5 * (1 + math.cos(math.pi * progress)) if t.lr_schedule == "cosine" else 1 - progress
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * left)


def make_optimizer(model: Transformer, t) -> torch.optim.AdamW:
    trained = [p for p in model.parameters() if p.requires_grad]  # frozen ones (--train-experts) get no state
    decay = [p for p in trained if p.dim() >= 2]
    no_decay = [p for p in trained if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t.lr, betas=(t.beta1, t.beta2), **_fused_kwargs(model),
    )


def _fused_kwargs(model) -> dict:
    """The fused AdamW kernel (one pass over memory) where torch supports it for these parameters. FSDP's
    sharded parameters (DTensors) beside expert parallelism's plain ones cannot share one kernel call: then the
    single-tensor path."""
    kinds = {is_dtensor(p) for p in model.parameters()}
    if len(kinds) > 1:
        return {"foreach": False}
    p = next(model.parameters())
    if p.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64) and p.device.type in ("cpu", "cuda"):
        return {"fused": True}
    return {"foreach": True}


class KeptGradients:
    """Gradients allocated once and zeroed in place each step, where ``zero_grad(set_to_none=True)`` would free
    them and the backward allocate them again: 2.6 GB of new pages per step at 692M parameters, page-faulted in and
    fragmenting the heap between the activations (benchmarks/README.md, training at real sizes). A parameter the
    step's backward did not reach gets None before the optimizer sees it, as with set_to_none, so AdamW skips it
    as before and the numbers are the same. One process, not FSDP (whose gradients are its own)."""

    def __init__(self, model):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.reached: set[int] = set()
        for p in self.params:
            p.register_post_accumulate_grad_hook(lambda q: self.reached.add(id(q)))

    def zero(self) -> None:
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            else:
                p.grad.zero_()
        self.reached.clear()

    def drop_unreached(self) -> None:
        for p in self.params:
            if id(p) not in self.reached:
                p.grad = None


def create_optimizer_state(opt: torch.optim.Optimizer, kept: KeptGradients) -> None:
    """AdamW's state made before the first step's activations, not after them into the heap they fragment: one
    step of torch's own code at learning rate 0 on zero gradients (weights unchanged: decay x(1 - 0), update 0),
    then its step counts back to 0, so the state is what AdamW's first real step would have made."""
    kept.zero()
    lrs = [g["lr"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["lr"] = 0.0
    opt.step()
    for g, lr in zip(opt.param_groups, lrs):
        g["lr"] = lr
    for state in opt.state.values():
        state["step"].zero_()


def clip_gradients(model, info: DistInfo, clip: float) -> torch.Tensor:
    """Clip to a total gradient norm of ``clip`` (0 = no clipping); returns the norm before clipping.

    Under expert parallelism each rank holds different experts, so their squared
    norms are summed over ranks; replicated parameters count once.
    """
    max_norm = clip if clip > 0 else float("inf")
    if info.fsdp and info.world > 1:  # every rank holds distinct shards (and EP experts): one sum over ranks
        grads = [local(p.grad) for p in model.parameters() if p.grad is not None]
        sq = sum((g.double().pow(2).sum() for g in grads), torch.zeros((), dtype=torch.float64))
        norm = all_sum_(sq.reshape(1))[0].sqrt().float()
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
        return norm
    if not (info.expert_parallel and info.world > 1):
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    own = expert_params(model)
    params = [p for p in model.parameters() if p.grad is not None]
    rep = sum((p.grad.double().pow(2).sum() for p in params if id(p) not in own), torch.zeros((), dtype=torch.float64))
    exp = sum((p.grad.double().pow(2).sum() for p in params if id(p) in own), torch.zeros((), dtype=torch.float64))
    norm = (rep + all_sum_(exp.reshape(1))[0]).sqrt().float()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for p in params:
        p.grad.mul_(coef.to(p.grad.dtype))
    return norm
