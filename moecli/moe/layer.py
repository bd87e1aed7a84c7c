"""The MoE feed-forward layer: router -> dispatcher -> experts -> combine, plus shared experts.

Shape legend: B batch, S sequence, T = B*S tokens, D model dim, E routed experts,
K experts per token, N = T*K token-copies (assignments).

Dispatch sorts the N assignments by expert (stable, choice-major: every token's
first choice comes before any second choice, and earlier tokens before later
ones), so each expert computes on one contiguous slice. With a capacity factor,
each expert keeps only its first ``ceil(cf * T * K / E)`` assignments in that
order; dropped assignments add nothing (the token still flows on through the
residual connection).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from moecli.moe import balance
from moecli.config import BalanceConfig, MoEConfig
from moecli.parallel.collectives import global_mean_load
from moecli.parallel.expert_parallel import expert_parallel_ffn
from moecli.moe.experts import GroupedExperts, SwiGLU
from moecli.moe.router import Router, RouterOutput
from moecli.moe.saliency import ExpertSaliency


@dataclass
class Dispatch:
    token_N: torch.Tensor  # which token each kept assignment belongs to (sorted by expert)
    choice_N: torch.Tensor  # which of the token's K choices it is
    counts_E: torch.Tensor  # kept assignments per expert (sums to len(token_N))
    load_E: torch.Tensor  # wanted assignments per expert, before capacity
    dropped: int  # assignments dropped by capacity


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def dispatch(idx_TK: torch.Tensor, keep_TK: torch.Tensor | None, num_experts: int, capacity: int = 0) -> Dispatch:
    """Sort assignments by expert; with capacity > 0, keep each expert's first `capacity`."""
    T, K = idx_TK.shape
    E = num_experts
    flat_N = idx_TK.t().reshape(-1)  # choice-major order: n = k*T + t
    if keep_TK is not None:
        flat_N = torch.where(keep_TK.t().reshape(-1), flat_N, torch.full_like(flat_N, E))  # E = "not routed"
    sorted_N, order_N = torch.sort(flat_N, stable=True)
    load_all = torch.bincount(flat_N, minlength=E + 1)
    load_E = load_all[:E]
    valid_N = sorted_N < E
    dropped = 0
    if capacity > 0:
        start_E = torch.cumsum(load_all, 0) - load_all
        pos_N = torch.arange(sorted_N.numel(), device=sorted_N.device) - start_E[sorted_N]
        kept_N = valid_N & (pos_N < capacity)
        dropped = int((valid_N & ~kept_N).sum())
        valid_N = kept_N
        counts_E = load_E.clamp(max=capacity)
    else:
        counts_E = load_E
    order_N = order_N[valid_N]
    return Dispatch(order_N % T, order_N // T, counts_E, load_E, dropped)


class MoELayer(nn.Module):
    """Drop-in replacement for a dense FFN: ``forward(x_BSD) -> y_BSD``.

    After each forward, ``self.aux`` holds the unweighted balance losses of that
    forward and ``self.stats`` detached routing statistics (load per expert,
    dropped assignments). Set ``capture = True`` to keep the RouterOutput in
    ``self.last_route`` (used by inspect-routing), and ``saliency`` to an
    ExpertSaliency to add each forward's routed rows to it (moe prune).
    """

    def __init__(self, d_model: int, cfg: MoEConfig, bal: BalanceConfig):
        super().__init__()
        self.cfg, self.bal = cfg, bal
        self.router = Router(d_model, cfg)
        self.experts = GroupedExperts(cfg.num_experts, d_model, cfg.expert_ffn, bias=cfg.expert_ffn_bias,
                                      act=cfg.expert_act, alpha=cfg.swiglu_alpha, limit=cfg.swiglu_limit)
        self.shared = SwiGLU(d_model, cfg.shared_hidden) if cfg.num_shared_experts > 0 else None
        self.shared_gate = nn.Linear(d_model, 1, bias=False) if cfg.shared_gate else None
        self.aux: dict[str, torch.Tensor] = {}
        self.stats: dict[str, torch.Tensor | int] = {}
        self.capture = False
        self.last_route: RouterOutput | None = None
        self.saliency: ExpertSaliency | None = None
        self.ep_world = 1  # > 1: experts sharded over ranks (distributed.shard_experts)
        # > 1: data-parallel ranks; the balance losses then use the expert loads of the
        # global batch (all-reduced), so their averaged gradient is the global-batch one.
        self.dp_world = 1

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        T, E, K = B * S, self.cfg.num_experts, self.cfg.top_k
        route = self.router(x_TD)
        cf = self.cfg.capacity_factor
        if not self.training and self.cfg.eval_capacity_factor >= 0:
            cf = self.cfg.eval_capacity_factor
        cap = expert_capacity(T, K, E, cf) if cf > 0 else 0
        d = dispatch(route.idx_TK, route.keep_TK, E, cap)

        x_ND = x_TD.index_select(0, d.token_N)
        w_N = route.weight_TK[d.token_N, d.choice_N]
        if self.cfg.weight_input:  # Llama 4: the expert computes on w * x, and its output is not weighted
            x_ND, w_N = x_ND * w_N.to(x_ND.dtype).unsqueeze(-1), None
        if self.ep_world > 1:
            y_ND = expert_parallel_ffn(self.experts, x_ND, d.counts_E, self.ep_world)
            y_ND = y_ND if w_N is None else y_ND * w_N.to(y_ND.dtype).unsqueeze(-1)
        elif self.saliency is not None:  # each expert's own output, then weighted: the saliency needs its norm
            y_ND = self.experts(x_ND, d.counts_E)
            self.saliency.add(route.scores_TE, route.idx_TK, d.token_N, d.choice_N, y_ND)
            y_ND = y_ND if w_N is None else y_ND * w_N.to(y_ND.dtype).unsqueeze(-1)
        else:
            y_ND = self.experts(x_ND, d.counts_E, w_N)  # weighted: y * w per row
        # in y's dtype, which is bf16 under autocast (the residual add promotes it back)
        out_TD = y_ND.new_zeros(T, D).index_add_(0, d.token_N, y_ND)
        if self.shared is not None:
            s_TD = self.shared(x_TD)
            if self.shared_gate is not None:
                s_TD = s_TD * torch.sigmoid(self.shared_gate(x_TD))
            out_TD = out_TD + s_TD

        # on the CPU, where training and inspect-routing sum them (one small copy; dispatch has synced already)
        counts_E = d.load_E.detach().cpu()
        self.stats = {"load_E": counts_E, "dropped": d.dropped, "assignments": int(counts_E.sum())}
        if self.capture:
            self.last_route = route
        if self.training or torch.is_grad_enabled():
            load_E = d.load_E
            if self.dp_world > 1 and (self.bal.aux_loss_coef > 0 or self.bal.device_loss_coef > 0):
                load_E = global_mean_load(load_E)
            self.aux = balance.losses(route, load_E, B, S, E, K, self.bal)
        return out_TD.view(B, S, D)

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor, rate: float) -> None:
        """DeepSeek-V3 aux-loss-free balancing: raise the bias of under-loaded experts, lower over-loaded."""
        load = load_E.to(self.router.expert_bias.device, torch.float32)
        self.router.expert_bias.add_(rate * torch.sign(load.mean() - load))
