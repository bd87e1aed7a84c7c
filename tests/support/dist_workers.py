"""Functions run inside spawned ranks by test_distributed.py (importable by the child processes)."""

import torch
import torch.distributed as dist

from moecli.config import BalanceConfig, MoEConfig
from moecli.parallel.launch import init_from_env
from moecli.parallel.expert_parallel import shard_experts
from moecli.moe.layer import MoELayer


class _Holder(torch.nn.Module):  # shard_experts works on anything with .moe_layers
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    @property
    def moe_layers(self):
        return [(0, self.layer)]


def expert_parallel_layer_check(E, K, capacity_factor, starve_last_rank=False):
    """Compare the expert-parallel layer with the single-process layer on this rank's tokens. With
    starve_last_rank, the router's selection bias keeps every token away from the last rank's experts."""
    info = init_from_env(expert_parallel=True)
    torch.manual_seed(0)  # identical initial weights on every rank
    cfg = MoEConfig(num_experts=E, top_k=K, expert_ffn=12, capacity_factor=capacity_factor, num_shared_experts=1)
    ref = MoELayer(16, cfg, BalanceConfig()).double()
    with torch.no_grad():
        ref.router.gate.weight.normal_(0, 1.0)
        if starve_last_rank:
            ref.router.expert_bias[E - E // info.world:] = -100.0
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


def sharded_eval_check(expert_parallel):
    """Validation split over ranks (a last batch smaller than the world included) vs one process."""
    from moecli.config import recipe_from_dict
    from moecli.training.validation import evaluate_loss
    from moecli.model.transformer import build_model

    info = init_from_env(expert_parallel=expert_parallel)
    recipe = recipe_from_dict({"name": "t", "model": {"n_layers": 2, "d_model": 32, "n_heads": 2, "n_kv_heads": 1,
                                                      "ffn_dim": 64, "context": 64},
                               "train": {"seq_len": 16},
                               "moe": {"num_experts": 4, "top_k": 2, "expert_ffn": 32}})
    model = build_model(recipe, seed=0).double()
    tokens = torch.randint(0, 256, (400,), generator=torch.Generator().manual_seed(3))
    starts = list(range(0, 400 - 17, 16))[:9]  # 9 windows, batches of 4: the last one has a single window
    dist.barrier()
    # the single-process value, computed with torch.distributed out of the picture
    import moecli.training.validation as ev

    real_current = ev.current
    ev.current = lambda: type(info)()
    ref, ref_count = evaluate_loss(model, tokens, 16, starts, 4)
    ev.current = real_current
    if expert_parallel:
        shard_experts(model, info)
    rows = []
    model.register_forward_pre_hook(lambda mod, args: rows.append(args[0].shape[0]))
    got, count = evaluate_loss(model, tokens, 16, starts, 4)
    return {"ref": ref, "got": got, "ref_count": ref_count, "count": count, "rows_rank0": rows}
