"""Functions run inside spawned ranks by test_distributed.py (importable by the child processes)."""

import torch
import torch.distributed as dist

from moecli.config import BalanceConfig, MoEConfig
from moecli.distributed import init_from_env, shard_experts
from moecli.moe import MoELayer


class _Holder(torch.nn.Module):  # shard_experts works on anything with .moe_layers
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    @property
    def moe_layers(self):
        return [(0, self.layer)]


def expert_parallel_layer_check(E, K, capacity_factor):
    """Compare the expert-parallel layer with the single-process layer on this rank's tokens."""
    info = init_from_env(expert_parallel=True)
    torch.manual_seed(0)  # identical initial weights on every rank
    cfg = MoEConfig(num_experts=E, top_k=K, expert_ffn=12, capacity_factor=capacity_factor, num_shared_experts=1)
    ref = MoELayer(16, cfg, BalanceConfig()).double()
    with torch.no_grad():
        ref.router.gate.weight.normal_(0, 1.0)
    ep = MoELayer(16, cfg, BalanceConfig()).double()
    ep.load_state_dict(ref.state_dict())
    shard_experts(_Holder(ep), info)
    torch.manual_seed(100 + info.rank)  # each rank has its own tokens
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    g = torch.randn(2, 9, 16, dtype=torch.float64)
    xr, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref = ref(xr)
    y_ref.backward(g)
    y_ep = ep(xe)
    y_ep.backward(g)
    out = {"y": float((y_ref - y_ep).abs().max()), "dx": float((xr.grad - xe.grad).abs().max()),
           "router": float((ref.router.gate.weight.grad - ep.router.gate.weight.grad).abs().max()),
           "dropped_ref": ref.stats["dropped"], "dropped_ep": ep.stats["dropped"]}
    El = E // info.world
    for name in ("w1_EDF", "w3_EDF", "w2_EFD"):
        full = getattr(ref.experts, name).grad.clone()
        dist.all_reduce(full)  # the experts see every rank's tokens
        mine = full[info.rank * El:(info.rank + 1) * El]
        out[name] = float((mine - getattr(ep.experts, name).grad).abs().max())
    worst = torch.tensor([max(v for k, v in out.items() if not k.startswith("dropped"))], dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    out["worst_over_ranks"] = float(worst)
    return out
