"""Experts: SwiGLU feed-forward networks, one dense and one grouped (3D weights).

Shape legend: N routed token-copies (sorted by expert), D model dim, F hidden dim, E experts.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SwiGLU(nn.Module):
    """y = w2(silu(w1 x) * w3 x): the dense FFN, also used for shared experts."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)  # gate
        self.w3 = nn.Linear(d_model, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, d_model, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored as 3D tensors: w1_EDF, w3_EDF (gate, up) and w2_EFD (down).

    ``forward(x_ND, counts_E)`` takes tokens already sorted by expert: the first
    counts_E[0] rows go to expert 0, the next counts_E[1] to expert 1, and so on.
    Each expert multiplies only its own contiguous slice.
    """

    def __init__(self, num_experts: int, d_model: int, hidden: int):
        super().__init__()
        self.num_experts, self.d_model, self.hidden = num_experts, d_model, hidden
        self.w1_EDF = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.w3_EDF = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.w2_EFD = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        for w in (self.w1_EDF, self.w3_EDF, self.w2_EFD):  # Transformer.init_weights re-initialises with a seed
            nn.init.normal_(w, std=0.02)

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        counts = counts_E.tolist()
        # unbind once (not w[e] per expert): its backward stacks the per-expert
        # gradients in one go instead of writing a full zero gradient per expert.
        w1s, w3s, w2s = self.w1_EDF.unbind(0), self.w3_EDF.unbind(0), self.w2_EFD.unbind(0)
        outs = []
        for e, x_nD in enumerate(x_ND.split(counts)):
            if counts[e] == 0:
                continue
            h_nF = F.silu(x_nD @ w1s[e]) * (x_nD @ w3s[e])
            outs.append(h_nF @ w2s[e])
        if not outs:
            return x_ND.new_zeros(0, self.d_model)
        return torch.cat(outs, dim=0)
