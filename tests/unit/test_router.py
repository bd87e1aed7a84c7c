"""Router, dispatcher and balance-loss math against hand-computed cases."""

import math

import pytest
import torch

from moecli.moe import balance
from moecli.config import BalanceConfig, MoEConfig
from moecli.moe.layer import MoELayer, dispatch, expert_capacity
from moecli.moe.router import Router


def router_with_logits(logits, **cfg):
    """A router whose gate reproduces `logits` exactly for identity-ish inputs x = I."""
    logits = torch.tensor(logits, dtype=torch.float32)
    T, E = logits.shape
    r = Router(T, MoEConfig(num_experts=E, **cfg))
    with torch.no_grad():
        r.gate.weight.copy_(logits.t())  # x = one-hot rows -> logits row t
    r.eval()
    return r, torch.eye(T)


def test_softmax_top2_renormalised():
    r, x = router_with_logits([[1.0, 2.0, 0.0, 3.0]], top_k=2, renormalize=True)
    out = r(x)
    assert out.idx_TK.tolist() == [[3, 1]]
    e3, e2 = math.exp(3), math.exp(2)
    assert out.weight_TK[0].tolist() == pytest.approx([e3 / (e3 + e2), e2 / (e3 + e2)], rel=1e-6)


def test_softmax_top1_not_renormalised_keeps_probability():
    r, x = router_with_logits([[0.0, math.log(3.0)]], top_k=1, renormalize=False)
    out = r(x)
    assert out.idx_TK.tolist() == [[1]]
    assert out.weight_TK.item() == pytest.approx(0.75, rel=1e-6)


def test_sigmoid_bias_changes_selection_not_weight_and_scaling():
    r, x = router_with_logits([[2.0, 1.0, 0.0]], top_k=1, score_func="sigmoid", renormalize=False, routed_scaling=2.5)
    r.expert_bias.copy_(torch.tensor([0.0, 0.5, 0.0]))  # sigmoid(1)+0.5 > sigmoid(2)
    out = r(x)
    assert out.idx_TK.tolist() == [[1]]
    assert out.weight_TK.item() == pytest.approx(2.5 / (1 + math.exp(-1.0)), rel=1e-6)


def test_noise_and_jitter_act_only_in_training_and_as_specified():
    torch.manual_seed(0)
    T, D, E = 64, 16, 8
    x = torch.randn(T, D)
    cfg = dict(num_experts=E, top_k=2, renormalize=False)
    plain, noisy = Router(D, MoEConfig(**cfg)), Router(D, MoEConfig(**cfg, router_noise=1.0, router_jitter=0.2))
    noisy.gate.load_state_dict(plain.gate.state_dict())
    for r in (plain, noisy):
        r.eval()
    a, b = plain(x), noisy(x)  # eval: neither noise nor jitter
    assert torch.equal(a.idx_TK, b.idx_TK) and torch.equal(a.weight_TK, b.weight_TK)
    noisy.train()
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    out = noisy(x)
    # the same draws, in the router's order: jitter U(0.8, 1.2) on x, then N(0, 1) on the logits
    u = torch.empty(T, D).uniform_(0.8, 1.2, generator=gen)
    logits = (x * u) @ noisy.gate.weight.t()
    noise = torch.randn(T, E, generator=gen)
    torch.testing.assert_close(out.logits_TE, logits)  # the clean (jittered) logits, what the losses see
    sel = torch.softmax(logits + noise, -1)
    assert torch.equal(out.idx_TK, sel.topk(2, dim=-1).indices)  # chosen on the noisy scores
    torch.testing.assert_close(out.weight_TK, sel.gather(1, out.idx_TK))  # weighted by them too
    torch.testing.assert_close(out.scores_TE, torch.softmax(logits, -1))
    assert not torch.equal(out.idx_TK, a.idx_TK)  # noise of std 1 changes some choices


def test_group_limited_routing():
    # 4 experts in 2 groups; the single best expert (2) is in group 1, but group 0 has the higher top-2 sum
    logits = [[2.0, 1.9, 2.1, -5.0]]
    r, x = router_with_logits(logits, top_k=2, score_func="sigmoid", n_groups=2, topk_groups=1)
    assert r(x).idx_TK.tolist() == [[0, 1]]
    r2, x2 = router_with_logits(logits, top_k=2, score_func="sigmoid")
    assert r2(x2).idx_TK.tolist() == [[2, 0]]


def test_random_routing_keeps_second_with_probability_2g():
    torch.manual_seed(0)
    T = 20000
    r = Router(2, MoEConfig(num_experts=2, top_k=2, random_routing=True))
    with torch.no_grad():
        r.gate.weight.copy_(torch.tensor([[math.log(0.8)], [math.log(0.2)]]).view(2, 1).repeat(1, 2) / 2)
    r.train()
    out = r(torch.ones(T, 2))  # every token: g = (0.8, 0.2) -> keep 2nd with p = 0.4
    assert out.keep_TK[:, 0].all()
    assert out.keep_TK[:, 1].float().mean().item() == pytest.approx(0.4, abs=0.02)
    assert (out.weight_TK[:, 1][~out.keep_TK[:, 1]] == 0).all()


def test_dispatch_sorts_by_expert_choice_major():
    idx_TK = torch.tensor([[1, 0], [0, 1], [1, 2]])
    d = dispatch(idx_TK, None, num_experts=3)
    assert d.counts_E.tolist() == [2, 3, 1]
    # expert 0: token 1 (1st choice), token 0 (2nd); expert 1: tokens 0, 2 (1st), 1 (2nd); expert 2: token 2
    assert d.token_N.tolist() == [1, 0, 0, 2, 1, 2]
    assert d.choice_N.tolist() == [0, 1, 0, 0, 1, 1]
    assert d.dropped == 0


def test_capacity_drops_the_right_tokens():
    # 6 tokens top-1: expert 0 wanted by tokens 0,1,2,4; expert 1 by 3,5; E=2, cf=1.0 -> capacity 3
    idx_TK = torch.tensor([[0], [0], [0], [1], [0], [1]])
    cap = expert_capacity(6, 1, 2, 1.0)
    assert cap == 3
    d = dispatch(idx_TK, None, 2, cap)
    assert d.token_N.tolist() == [0, 1, 2, 3, 5]  # token 4 (the 4th for expert 0) is dropped
    assert d.counts_E.tolist() == [3, 2]
    assert d.load_E.tolist() == [4, 2]
    assert d.dropped == 1


def test_capacity_prefers_first_choices_over_second():
    # expert 0 is token 0's 2nd choice and token 1's 1st choice; capacity 1 keeps token 1
    idx_TK = torch.tensor([[1, 0], [0, 1]])
    d = dispatch(idx_TK, None, 2, capacity=1)
    assert list(zip(d.token_N.tolist(), d.choice_N.tolist())) == [(1, 0), (0, 0)]
    assert d.dropped == 2


def test_dropped_token_gets_zero_moe_output():
    torch.manual_seed(0)
    layer = MoELayer(8, MoEConfig(num_experts=2, top_k=1, expert_ffn=16, capacity_factor=0.5), BalanceConfig())
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[0] = 1.0  # positive inputs -> everyone wants expert 0
    layer.eval()
    x = torch.rand(1, 8, 8) + 0.1
    y = layer(x)
    cap = expert_capacity(8, 1, 2, 0.5)  # 2
    assert (y[0, :cap].abs().sum(-1) > 0).all()
    assert (y[0, cap:] == 0).all()
    assert layer.stats["dropped"] == 8 - cap


@pytest.mark.parametrize("eval_cf,eval_dropped", [(-1.0, 6), (0.0, 0), (1.5, 8 - 6), (2.0, 0)])
def test_eval_capacity_factor_applies_when_not_training(eval_cf, eval_dropped):
    """Everyone wants expert 0 (8 tokens, top-1, 2 experts): training keeps ceil(0.5 * 8 / 2) = 2 of them;
    out of training mode the capacity is eval_capacity_factor's (-1: the same, 0: dropless, 1.5: 6, 2.0: 8)."""
    cfg = MoEConfig(num_experts=2, top_k=1, expert_ffn=16, capacity_factor=0.5, eval_capacity_factor=eval_cf)
    layer = MoELayer(8, cfg, BalanceConfig())
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[0] = 1.0
    x = torch.rand(1, 8, 8) + 0.1
    layer.train()
    layer(x)
    assert layer.stats["dropped"] == 6
    layer.eval()
    y = layer(x)
    assert layer.stats["dropped"] == eval_dropped
    assert (y[0, 8 - eval_dropped:] == 0).all() and (y[0, : 8 - eval_dropped].abs().sum(-1) > 0).all()


def _identical_experts_layer(E, K, renormalize, shared=0):
    torch.manual_seed(1)
    cfg = MoEConfig(num_experts=E, top_k=K, expert_ffn=16, renormalize=renormalize, num_shared_experts=shared)
    layer = MoELayer(8, cfg, BalanceConfig())
    with torch.no_grad():
        for w in (layer.experts.w1_EDF, layer.experts.w3_EDF, layer.experts.w2_EFD):
            w.copy_(torch.randn_like(w[0]).expand_as(w) * 0.3)
        layer.router.gate.weight.normal_()
    return layer.eval()


@pytest.mark.parametrize("E,K", [(4, 2), (8, 3), (6, 6)])
def test_renormalised_identical_experts_equal_single_expert(E, K):
    layer = _identical_experts_layer(E, K, renormalize=True)
    x = torch.randn(2, 5, 8)
    e = layer.experts
    expected = torch.nn.functional.silu(x @ e.w1_EDF[0]) * (x @ e.w3_EDF[0]) @ e.w2_EFD[0]
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_without_renormalisation_identical_experts_scale_by_gate_mass():
    layer = _identical_experts_layer(4, 2, renormalize=False)
    x = torch.randn(1, 3, 8)
    e = layer.experts
    single = torch.nn.functional.silu(x @ e.w1_EDF[0]) * (x @ e.w3_EDF[0]) @ e.w2_EFD[0]
    route = layer.router(x.view(3, 8))
    mass = route.weight_TK.sum(-1).view(1, 3, 1)
    torch.testing.assert_close(layer(x), single * mass, rtol=1e-5, atol=1e-6)
    assert (mass < 1).all()


def test_aux_loss_hand_computed():
    scores = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1]])
    load = torch.tensor([1, 1, 0, 0])  # top-1 choices
    # f = [.5,.5,0,0], P = [.4,.4,.1,.1] -> E * sum f*P = 4 * 0.4 = 1.6
    assert balance.aux_loss(scores, load, 1).item() == pytest.approx(1.6)
    uniform = torch.full((4, 4), 0.25)
    assert balance.aux_loss(uniform, torch.tensor([1, 1, 1, 1]), 1).item() == pytest.approx(1.0)


def test_z_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp: log 2, log 4 -> mean of squares
    assert balance.z_loss(logits).item() == pytest.approx((math.log(2) ** 2 + math.log(4) ** 2) / 2)


def test_seq_aux_loss_is_per_sequence():
    # two sequences each entirely on one expert: globally balanced, per sequence collapsed
    scores = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    idx = torch.tensor([[0], [0], [1], [1]])
    load = torch.tensor([2, 2])
    assert balance.aux_loss(scores, load, 1).item() == pytest.approx(1.0)
    assert balance.seq_aux_loss(scores, idx, B=2, S=2, top_k=1).item() == pytest.approx(2.0)


def test_device_loss_hand_computed():
    scores = torch.full((4, 4), 0.25)
    load = torch.tensor([2, 2, 0, 0])  # all load on device 0 (experts 0,1)
    # f_i = E*load/(T*K) = [2,2,0,0]; device means [2, 0]; P' = [0.5, 0.5] -> 1.0
    assert balance.device_loss(scores, load, 1, 2).item() == pytest.approx(1.0)
    balanced = torch.tensor([1, 1, 1, 1])
    assert balance.device_loss(scores, balanced, 1, 2).item() == pytest.approx(1.0)
    skew_scores = torch.tensor([[0.4, 0.4, 0.1, 0.1]] * 4)
    assert balance.device_loss(skew_scores, load, 1, 2).item() == pytest.approx(2 * 0.8)


def test_bias_update_moves_toward_balance():
    layer = MoELayer(4, MoEConfig(num_experts=4, top_k=1, expert_ffn=4), BalanceConfig(bias_update_rate=0.1))
    layer.update_bias(torch.tensor([10, 2, 2, 2]), 0.1)
    assert layer.router.expert_bias.tolist() == pytest.approx([-0.1, 0.1, 0.1, 0.1])


@pytest.mark.parametrize("shared", [0, 1])
def test_layer_runs_under_bf16_autocast(shared):
    """Mixed precision: the experts run in bf16 and the combine follows their dtype (it used to fail)."""
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, top_k=2, expert_ffn=32, num_shared_experts=shared)
    layer = MoELayer(16, cfg, BalanceConfig(aux_loss_coef=0.01))
    x = torch.randn(2, 8, 16, requires_grad=True)
    ref = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, atol=2e-2, rtol=2e-2)
    (y.float().sum() + layer.aux["aux"]).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert layer.experts.w1_EDF.grad.dtype == torch.float32  # parameters and their gradients stay fp32


@pytest.mark.parametrize("load,k,status,dead", [
    ([25, 25, 25, 25], 2, "ok", []),
    ([10, 10, 10, 25], 1, "ok", []),             # max_vio 0.82
    ([0, 50, 50, 50], 1, "imbalanced", [0]),     # a dead expert
    ([5, 5, 5, 85], 1, "imbalanced", []),        # max_vio 2.4, not collapsed: one expert may take 3.6x the mean
    ([2, 2, 2, 94], 1, "collapsed", []),         # 3.76x the mean >= 0.9 * E/k
    ([0, 100, 100, 0], 2, "collapsed", [0, 3]),  # top-2 onto two experts: each at its 1/k ceiling
])
def test_load_health(load, k, status, dead):
    h = balance.load_health(torch.tensor(load), k)
    assert (h["status"], h["dead"]) == (status, dead)
    mean = sum(load) / len(load)
    assert h["max_vio"] == pytest.approx(max(load) / mean - 1)


def test_router_stays_fp32_under_bf16_autocast():
    """train.precision bf16-mixed runs the forward under autocast; the router's logits, scores and
    choices are still the fp32 ones (a bf16 router product would round the logits)."""
    torch.manual_seed(0)
    r = Router(32, MoEConfig(num_experts=8, top_k=2))
    x = torch.randn(50, 32)
    ref = r(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = r(x)
    assert out.logits_TE.dtype == torch.float32 and torch.equal(out.logits_TE, ref.logits_TE)
    assert torch.equal(out.idx_TK, ref.idx_TK) and torch.equal(out.weight_TK, ref.weight_TK)
