"""Expert saliency (moe/saliency.py) against a direct per-expert computation, and the choice of experts to keep."""

import pytest
import torch
import torch.nn.functional as F

from moecli.config import BalanceConfig, MoEConfig
from moecli.moe.layer import MoELayer
from moecli.moe.saliency import ExpertSaliency, keep_best

CASES = {
    "softmax top-2": dict(num_experts=6, top_k=2, renormalize=True),
    "softmax top-3, not renormalised, scaled": dict(num_experts=8, top_k=3, renormalize=False, routed_scaling=2.0),
    "sigmoid groups, aux-free bias": dict(num_experts=8, top_k=2, score_func="sigmoid", n_groups=4, topk_groups=2),
    "input-weighted top-1": dict(num_experts=4, top_k=1, weight_input=True, score_func="sigmoid"),
    "capacity drops": dict(num_experts=4, top_k=2, eval_capacity_factor=0.5),
}


def direct(layer: MoELayer, x_TD: torch.Tensor) -> torch.Tensor:
    """count, gate, EAN and REAP sums of each expert, one token and one expert at a time: g the router's scores at
    the token's top-k renormalised over them, y the expert's SwiGLU output (on g x for input-weighted experts).
    Assignments over an expert's capacity are left out, as the layer drops them."""
    cfg, ex = layer.cfg, layer.experts
    route = layer.router(x_TD)
    T, E, K = x_TD.shape[0], cfg.num_experts, cfg.top_k
    sums = torch.zeros(4, E, dtype=torch.float64)
    cap = -(-int(cfg.eval_capacity_factor * T * K) // E) if cfg.eval_capacity_factor > 0 else None
    taken = [0] * E
    for k in range(K):  # choice-major, as the dispatcher keeps an expert's first assignments
        for t in range(T):
            e = int(route.idx_TK[t, k])
            if cap is not None and taken[e] >= cap:
                continue
            taken[e] += 1
            g_K = route.scores_TE[t, route.idx_TK[t]]
            g = float(g_K[k] / g_K.sum())
            x = x_TD[t] * route.weight_TK[t, k] if cfg.weight_input else x_TD[t]
            y = (F.silu(x @ ex.w1_EDF[e]) * (x @ ex.w3_EDF[e])) @ ex.w2_EFD[e]
            n = float(y.norm())
            sums[:, e] += torch.tensor([1.0, g, n, g * n], dtype=torch.float64)
    return sums


@pytest.mark.parametrize("case", CASES)
def test_saliency_equals_a_direct_per_expert_computation(case):
    torch.manual_seed(0)
    layer = MoELayer(16, MoEConfig(expert_ffn=24, **CASES[case]), BalanceConfig()).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
        layer.router.expert_bias.uniform_(-0.1, 0.1)
    x_BSD = torch.randn(3, 10, 16)
    with torch.no_grad():
        plain = layer(x_BSD)
        layer.saliency = ExpertSaliency(layer.cfg.num_experts)
        observed = layer(x_BSD)
        want = direct(layer, x_BSD.reshape(-1, 16))
    torch.testing.assert_close(observed, plain, rtol=1e-5, atol=1e-6)  # observing leaves the output as it was
    s = layer.saliency
    assert s.tokens == 30 and s.sums_4E[0].tolist() == want[0].tolist()
    torch.testing.assert_close(s.sums_4E, want, rtol=1e-5, atol=1e-7)
    reap = s.scores("reap")
    routed = want[0] > 0
    torch.testing.assert_close(reap[routed], (want[3] / want[0])[routed], rtol=1e-5, atol=0)
    assert (reap[~routed] == 0).all()
    assert torch.equal(s.scores("frequency"), want[0]) and torch.equal(s.scores("ean"), s.sums_4E[2])


def test_saliency_round_trips_and_merges():
    s = ExpertSaliency(3)
    s.sums_4E = torch.tensor([[2.0, 0, 1], [1.5, 0, 0.5], [4.0, 0, 3], [3.0, 0, 1.5]], dtype=torch.float64)
    s.tokens = 7
    back = ExpertSaliency.from_dict(s.to_dict())
    assert torch.equal(back.sums_4E, s.sums_4E) and back.tokens == 7
    back.merge(s)
    assert back.tokens == 14 and torch.equal(back.sums_4E, 2 * s.sums_4E)
    assert back.scores("reap").tolist() == [1.5, 0.0, 1.5]
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    assert torch.equal(s.scores("random", g1), s.scores("random", g2))


def test_keep_best_ranks_within_groups_and_breaks_ties_by_index():
    scores = torch.tensor([5.0, 1.0, 3.0, 3.0, 0.0, 9.0, 8.0, 7.0])
    assert keep_best(scores, 4) == [0, 5, 6, 7]
    assert keep_best(scores, 3) == [5, 6, 7]
    assert keep_best(torch.tensor([1.0, 2.0, 2.0, 2.0]), 2) == [1, 2]  # a tie: the lower index
    # two groups of 4: two from each, although group 2 holds three of the four best
    assert keep_best(scores, 4, groups=2) == [0, 2, 5, 6]
    assert keep_best(torch.tensor([9.0, 8.0, 7.0, 6.0, 1.0, 2.0, 3.0, 0.0]), 4, groups=2) == [0, 1, 5, 6]
