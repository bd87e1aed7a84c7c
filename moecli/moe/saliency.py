"""How much each routed expert of one MoE layer contributes, summed over the tokens forwards route to it: what
``moe prune`` ranks experts by and ``moe inspect-routing`` shows.

For expert e and each assignment (token t, choice k) routed to it (and kept by capacity), with g the router's
scores at t's top-k choices renormalised to sum to 1 over them (REAP's gate: the bias of aux-loss-free routing,
the routed scaling and an un-renormalised top-k do not enter) and y = f_e(x_t) the expert's own output, before
a gate weights it (Llama 4's input-weighted experts: f_e(w x_t), what the layer adds):

    count_E   assignments routed to e                     (frequency pruning)
    gate_E    sum of g                                    (mean gate: gate_E / count_E)
    ean_E     sum of ||y||_2                              (EAN: expert activation norm)
    reap_E    sum of g * ||y||_2                          (REAP: reap_E / count_E, arXiv 2510.13999)

These come from the forward the model runs anyway (``MoELayer.saliency``): one norm per routed row, no
forward of an expert on tokens not routed to it.
"""

from __future__ import annotations

import torch

METHODS = ("reap", "ean", "frequency", "random")  # what an expert may be ranked by (moe prune --method)


class ExpertSaliency:
    """Running sums of one MoE layer of E routed experts (float64, on the CPU: one small copy per forward)."""

    def __init__(self, E: int):
        self.E = E
        self.sums_4E = torch.zeros(4, E, dtype=torch.float64)  # count, gate, ean, reap
        self.tokens = 0

    def add(self, scores_TE: torch.Tensor, idx_TK: torch.Tensor, token_N: torch.Tensor, choice_N: torch.Tensor,
            y_ND: torch.Tensor) -> None:
        """One forward's routed rows: y_ND the experts' outputs (unweighted), row n that of token token_N[n]'s
        choice choice_N[n]."""
        g_TK = scores_TE.detach().float().gather(1, idx_TK)
        g_TK = g_TK / g_TK.sum(-1, keepdim=True).clamp_min(1e-20)
        g_N, e_N = g_TK[token_N, choice_N], idx_TK[token_N, choice_N]
        norm_N = torch.linalg.vector_norm(y_ND.detach().float(), dim=-1)
        rows_4N = torch.stack([torch.ones_like(g_N), g_N, norm_N, g_N * norm_N])
        self.sums_4E += torch.zeros(4, self.E, device=g_N.device).index_add_(1, e_N, rows_4N).double().cpu()
        self.tokens += scores_TE.shape[0]

    def merge(self, other: "ExpertSaliency") -> None:
        self.sums_4E += other.sums_4E
        self.tokens += other.tokens

    def to_dict(self) -> dict:
        """The sums, per expert (``from_dict`` reads them back: moe prune --scores)."""
        count, gate, ean, reap = self.sums_4E.tolist()
        return {"tokens": self.tokens, "count": count, "gate": gate, "ean": ean, "reap": reap}

    @classmethod
    def from_dict(cls, d: dict) -> "ExpertSaliency":
        s = cls(len(d["count"]))
        s.sums_4E = torch.tensor([d["count"], d["gate"], d["ean"], d["reap"]], dtype=torch.float64)
        s.tokens = int(d["tokens"])
        return s

    def scores(self, method: str, gen: torch.Generator | None = None) -> torch.Tensor:
        """One score per expert, higher = keep first: REAP's mean gated output norm over the expert's tokens
        (0 for an expert no token reached), EAN's summed output norm, the assignments counted, or a seeded
        random draw."""
        count, _, ean, reap = self.sums_4E
        if method == "reap":
            return torch.where(count > 0, reap / count.clamp_min(1), torch.zeros_like(reap))
        if method == "ean":
            return ean.clone()
        if method == "frequency":
            return count.clone()
        if method == "random":
            return torch.rand(self.E, generator=gen, dtype=torch.float64)
        raise ValueError(f"unknown method {method!r}")


def keep_best(scores_E: torch.Tensor, keep: int, groups: int = 1) -> list[int]:
    """The `keep` experts with the highest scores (ties: the lower index), in index order; with groups > 1 (the
    experts in `groups` contiguous blocks, group-limited routing), keep // groups from each block, so that every
    group keeps the same number."""
    E = scores_E.numel()
    per, size = keep // groups, E // groups
    kept: list[int] = []
    for g in range(groups):
        block = scores_E[g * size: (g + 1) * size]
        order = sorted(range(size), key=lambda e: (-float(block[e]), e))
        kept += [g * size + e for e in order[:per]]
    return sorted(kept)
