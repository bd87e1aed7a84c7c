"""The router: which k experts each token goes to, and with what weight.

Shape legend (the MoE letters of the one in docs/internals.md):
    B batch, S sequence, T tokens (= B*S), D model dim, E routed experts,
    K experts per token (top_k), G expert groups, F expert hidden dim, V vocab.

One forward, in order (each step optional per the recipe):
    1. jitter:   x_TD *= U(1-eps, 1+eps)                       (Switch, training only)
    2. logits:   logits_TE = x_TD @ gate_ED.T (+ bias_E)       (fp32; the bias: GPT-OSS)
    3. noise:    logits_TE += N(0, std^2)                      (noisy top-k, training only)
    4. scores:   softmax or sigmoid of logits_TE
    5. select:   top-k of scores + expert_bias_E               (aux-loss-free bias, DeepSeek-V3)
                 restricted to the best topk_groups groups     (group-limited routing)
    6. weights:  scores at the chosen experts, renormalised to sum to 1 (optional),
                 times routed_scaling
    7. random routing: the 2nd..k-th choice is kept with probability min(1, 2*gate) (GShard)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from moecli.config import MoEConfig


@dataclass
class RouterOutput:
    logits_TE: torch.Tensor  # raw router logits (fp32), before noise and bias
    scores_TE: torch.Tensor  # softmax/sigmoid scores (fp32), what balance losses use
    idx_TK: torch.Tensor  # chosen experts, best first (int64)
    weight_TK: torch.Tensor  # combine weights (fp32)
    keep_TK: torch.Tensor | None  # False where random routing dropped a choice; None = all kept

    def detached_cpu(self) -> "RouterOutput":
        """The same routing, detached and on the CPU (statistics are summed there, whatever the device)."""
        def cpu(t):
            return None if t is None else t.detach().cpu()
        return RouterOutput(cpu(self.logits_TE), cpu(self.scores_TE), cpu(self.idx_TK), cpu(self.weight_TK),
                            cpu(self.keep_TK))


class Router(nn.Module):
    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.num_experts = cfg.num_experts
        self.gate = nn.Linear(d_model, cfg.num_experts, bias=cfg.router_bias)
        # Aux-loss-free balancing bias: shifts selection only, never the weights.
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts))

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        cfg = self.cfg
        if self.training and cfg.router_jitter > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1 - cfg.router_jitter, 1 + cfg.router_jitter)
        with torch.autocast(x_TD.device.type, enabled=False):  # fp32 under bf16-mixed too (Switch: the
            logits_TE = F.linear(x_TD.float(), self.gate.weight.float(),  # router's softmax needs the range)
                                 None if self.gate.bias is None else self.gate.bias.float())
        noisy_TE = logits_TE
        if self.training and cfg.router_noise > 0:
            noisy_TE = logits_TE + torch.randn_like(logits_TE) * cfg.router_noise
        scores_TE = self.score(logits_TE)
        sel_scores_TE = self.score(noisy_TE) if noisy_TE is not logits_TE else scores_TE
        idx_TK = self.select(sel_scores_TE.detach())
        weight_TK = sel_scores_TE.gather(1, idx_TK)
        if cfg.renormalize:
            weight_TK = weight_TK / (weight_TK.sum(dim=-1, keepdim=True) + 1e-20)
        if cfg.routed_scaling != 1.0:
            weight_TK = weight_TK * cfg.routed_scaling
        keep_TK = None
        if self.training and cfg.random_routing and cfg.top_k > 1:
            g_TK = weight_TK.detach() / (weight_TK.detach().sum(dim=-1, keepdim=True) + 1e-20)
            keep_TK = torch.rand_like(g_TK) < (2 * g_TK).clamp(max=1.0)
            keep_TK[:, 0] = True  # the best expert is always used
            weight_TK = weight_TK * keep_TK
        return RouterOutput(logits_TE, scores_TE, idx_TK, weight_TK, keep_TK)

    def score(self, logits_TE: torch.Tensor) -> torch.Tensor:
        if self.cfg.score_func == "sigmoid":
            return torch.sigmoid(logits_TE)
        return torch.softmax(logits_TE, dim=-1)

    def select(self, scores_TE: torch.Tensor) -> torch.Tensor:
        """Top-k experts per token by (score + bias), within the best groups."""
        cfg = self.cfg
        sel_TE = scores_TE + self.expert_bias
        if cfg.n_groups > 1 and cfg.topk_groups < cfg.n_groups:
            T, E = sel_TE.shape
            sel_TGe = sel_TE.view(T, cfg.n_groups, E // cfg.n_groups)
            if cfg.score_func == "sigmoid" and E // cfg.n_groups >= 2:
                group_TG = sel_TGe.topk(2, dim=-1).values.sum(dim=-1)  # DeepSeek-V3: sum of top-2
            else:
                group_TG = sel_TGe.amax(dim=-1)  # DeepSeek-V2: best expert in the group
            keep_groups = group_TG.topk(cfg.topk_groups, dim=-1).indices
            mask_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter_(1, keep_groups, True)
            sel_TE = sel_TGe.masked_fill(~mask_TG.unsqueeze(-1), float("-inf")).view(T, E)
        return sel_TE.topk(cfg.top_k, dim=-1).indices
