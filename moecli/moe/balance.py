"""Load-balancing losses for one MoE layer (all unweighted; the model applies the coefficients).

With f_i the fraction of the T*K assignments that go to expert i and P_i the
mean (normalised) router score of expert i:

    aux     Switch/GShard:  E * sum_i f_i * P_i              (1.0 when perfectly balanced).
            DeepSeekMoE's expert-level loss is the same quantity.
    z       ST-MoE router z-loss: mean_t logsumexp(logits_t)^2.
    seq_aux DeepSeek-V3 sequence-wise loss: the aux loss computed within each
            sequence, then averaged over the batch.
    device  DeepSeekMoE device-level loss: experts split into D equal groups;
            sum_d mean_{i in d}(E*f_i) * sum_{i in d} P_i.
"""

from __future__ import annotations

import torch

from moecli.config import BalanceConfig


def _norm_scores(scores_TE: torch.Tensor) -> torch.Tensor:
    # softmax scores already sum to 1; sigmoid scores are normalised per token (DeepSeek-V3)
    return scores_TE / (scores_TE.sum(dim=-1, keepdim=True) + 1e-20)


def aux_loss(scores_TE: torch.Tensor, load_E: torch.Tensor, top_k: int) -> torch.Tensor:
    T, E = scores_TE.shape
    f_E = load_E.float() / (T * top_k)
    P_E = _norm_scores(scores_TE).mean(dim=0)
    return E * (f_E * P_E).sum()


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


def seq_aux_loss(scores_TE: torch.Tensor, idx_TK: torch.Tensor, B: int, S: int, top_k: int) -> torch.Tensor:
    E = scores_TE.shape[1]
    hits_BSE = torch.zeros(B * S, E, device=scores_TE.device).scatter_(1, idx_TK, 1.0).view(B, S, E)
    f_BE = hits_BSE.sum(dim=1) / (S * top_k)
    P_BE = _norm_scores(scores_TE).view(B, S, E).mean(dim=1)
    return (E * (f_BE * P_BE).sum(dim=-1)).mean()


def device_loss(scores_TE: torch.Tensor, load_E: torch.Tensor, top_k: int, num_devices: int) -> torch.Tensor:
    T, E = scores_TE.shape
    f_E = E * load_E.float() / (T * top_k)
    P_E = _norm_scores(scores_TE).mean(dim=0)
    f_D = f_E.view(num_devices, -1).mean(dim=1)
    P_D = P_E.view(num_devices, -1).sum(dim=1)
    return (f_D * P_D).sum()


def losses(route, load_E: torch.Tensor, B: int, S: int, E: int, K: int, bal: BalanceConfig) -> dict[str, torch.Tensor]:
    out = {}
    if bal.aux_loss_coef > 0:
        out["aux"] = aux_loss(route.scores_TE, load_E, K)
    if bal.z_loss_coef > 0:
        out["z"] = z_loss(route.logits_TE)
    if bal.seq_aux_loss_coef > 0:
        out["seq_aux"] = seq_aux_loss(route.scores_TE, route.idx_TK, B, S, K)
    if bal.device_loss_coef > 0:
        out["device"] = device_loss(route.scores_TE, load_E, K, bal.num_devices)
    return out


def load_health(load_E: torch.Tensor, top_k: int) -> dict:
    """The balance verdict on one layer's expert loads (assignment counts over some window).

    max_vio = max/mean - 1 (0 when balanced); dead = experts with no assignment; collapsed = the
    busiest expert takes >= 90% of what it could (a top-k token can send it at most 1/k of its load).
    """
    load = load_E.double()
    E, mean = load.numel(), load.mean()
    max_vio = float(load.max() / mean - 1) if mean > 0 else 0.0
    dead = [e for e in range(E) if load[e] == 0]
    collapsed = bool(top_k < E and mean > 0 and float(load.max() / mean) >= 0.9 * E / top_k)
    status = "collapsed" if collapsed else ("imbalanced" if max_vio > 1.0 or dead else "ok")
    return {"max_vio": max_vio, "dead": dead, "collapsed": collapsed, "status": status}


COEFS = {"aux": "aux_loss_coef", "z": "z_loss_coef", "seq_aux": "seq_aux_loss_coef", "device": "device_loss_coef"}
