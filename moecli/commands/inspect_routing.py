"""``moe inspect-routing``: how balanced and how specialised a model's routing is.

Runs the model over text with each MoE layer capturing its RouterOutput and
accumulates, per layer (E experts, K choices per token, T tokens):

    load_E         assignments per expert (T*K in all); share = load / (T*K)
    load_rel       load / (T*K/E): 1.0 = uniform
    max_vio        (max load - mean load) / mean load
    cv             std(load) / mean(load)
    entropy        mean over tokens of H(normalised scores) / log E  (1 = undecided router)
    load_entropy   H(share) / log E  (1 = perfectly balanced)
    dead/near-dead experts with no load / load_rel < near_dead
    dropped        fraction of assignments over capacity ceil(cf*T_batch*K/E)
    gate           mean combine weight per expert; mean top-1 weight
    z              logsumexp of the router logits: mean, std, max, mean z^2 (the z-loss)

Specialisation: tokens per expert (and P(expert | token)), vocabulary
specialisation (mean P(e | v) over the tokens e receives; K/E for a router
blind to the token, 1 for a pure token lookup), co-activation of all expert
pairs, per-domain expert shares (--domain name=file), and router saturation
(top-k overlap) against another checkpoint of the same run.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from moecli.moe.balance import load_health
from moecli.formats.native import dtype_name
from moecli.formats.checkpoint import load_checkpoint, open_to_run
from moecli.formats.layerwise import stream_forward, stream_plan, why_stream
from moecli.data.corpus import JSONL_FIELD
from moecli.data.tokens import default_batch, default_window, read_tokens, run_val_split
from moecli.errors import UserError, check_at_least
from moecli.moe.layer import expert_capacity
from moecli.moe.saliency import ExpertSaliency


class LayerAcc:
    """Running routing statistics of one MoE layer (all sums kept as tensors: no per-batch syncs)."""

    def __init__(self, E: int, K: int, V: int, scores_sum_to_one: bool = False):
        self.E, self.K, self.V = E, K, V
        self.scores_sum_to_one = scores_sum_to_one  # softmax scores need no renormalising
        self.load = torch.zeros(E, dtype=torch.int64)
        self.gate_sum = torch.zeros(E, dtype=torch.float64)
        self.coact = torch.zeros(E, E, dtype=torch.float64)
        self.tok_exp = torch.zeros(V * E, dtype=torch.int64)
        self.sums = torch.zeros(4, dtype=torch.float64)  # top-1 gate, entropy, z, z^2
        self.z_max = torch.tensor(-math.inf)
        self.tokens = 0
        self.dropped = 0
        self.saliency = ExpertSaliency(E)  # REAP's and EAN's sums, added by the forward (MoELayer.saliency)

    def add(self, route, token_ids_T: torch.Tensor, capacity_factor: float) -> None:
        """Count one batch's routing (``route``: CPU tensors, ``RouterOutput.detached_cpu``)."""
        E, K = self.E, self.K
        idx, w = route.idx_TK, route.weight_TK
        T = idx.shape[0]
        flat = idx.reshape(-1)
        load = torch.bincount(flat, minlength=E)
        self.load += load
        self.gate_sum += torch.zeros(E, dtype=w.dtype).index_add_(0, flat, w.reshape(-1))
        p = route.scores_TE
        if not self.scores_sum_to_one:
            p = p / p.sum(-1, keepdim=True).clamp_min(1e-20)
        z = torch.logsumexp(route.logits_TE, dim=-1)
        self.sums += torch.stack([w[:, 0].sum(), torch.special.entr(p).sum(), z.sum(), z.dot(z)]).double()
        self.z_max = torch.maximum(self.z_max, z.max())
        if K > 1:
            hits = torch.zeros(T, E, dtype=torch.float64).scatter_(1, idx, 1.0)
            self.coact.addmm_(hits.t(), hits)
        self.tok_exp += torch.bincount((token_ids_T.unsqueeze(1) * E + idx).reshape(-1), minlength=self.V * E)
        if capacity_factor > 0:  # each expert keeps its first `cap` assignments: the rest are dropped
            cap = expert_capacity(T, K, E, capacity_factor)
            self.dropped += int((load - cap).clamp_min(0).sum())
        self.tokens += T


def _entropy(p: torch.Tensor) -> float:
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def layer_report(acc: LayerAcc, tok, top_tokens: int, near_dead: float, capacity_factor: float) -> dict:
    E, K = acc.E, acc.K
    top1_sum, entropy_sum, z_sum, z_sq_sum = acc.sums.tolist()
    n_tok = max(acc.tokens, 1)
    n = acc.tokens * K
    load = acc.load.double()
    mean = load.mean()
    share = load / max(n, 1)
    load_rel = load / mean if mean > 0 else load
    tok_exp = acc.tok_exp.view(acc.V, E).double()
    occurrences = tok_exp.sum(1) / K  # tokens of each id (each makes K assignments)
    p_e_given_v = tok_exp / occurrences.clamp_min(1).unsqueeze(1)
    vocab_spec = (tok_exp * p_e_given_v).sum(0) / load.clamp_min(1)
    experts = []
    for e in range(E):
        col = tok_exp[:, e]
        top = torch.topk(col, min(top_tokens, int((col > 0).sum()))).indices.tolist() if col.sum() > 0 else []
        experts.append({
            "expert": e, "load": int(acc.load[e]), "share": float(share[e]), "load_rel": float(load_rel[e]),
            "mean_gate": float(acc.gate_sum[e] / acc.load[e]) if acc.load[e] else 0.0,
            "vocab_specialization": float(vocab_spec[e]),
            "top_tokens": [{"id": v, "text": tok.decode([v]), "count": int(col[v]), "p_expert_given_token":
                            float(p_e_given_v[v, e])} for v in top],
        })
    reap = acc.saliency.scores("reap").tolist()
    for e, row in enumerate(experts):  # what moe prune ranks experts by
        row["reap"], row["ean"] = reap[e], float(acc.saliency.sums_4E[2, e])
    health = load_health(acc.load, K)
    rep = {
        "experts_n": E, "top_k": K, "tokens": acc.tokens, "assignments": n,
        "max_vio": health["max_vio"], "cv": float(load.std(unbiased=False) / mean) if mean > 0 else 0.0,
        "entropy": entropy_sum / n_tok / math.log(E) if E > 1 else 0.0,
        "load_entropy": _entropy(share) / math.log(E) if E > 1 else 0.0,
        "dead": health["dead"],
        "near_dead": [e for e in range(E) if 0 < load_rel[e] < near_dead],
        "dropped_frac": acc.dropped / max(n, 1) if capacity_factor > 0 else None,
        "top1_gate_mean": top1_sum / n_tok,
        "z_mean": z_sum / n_tok,
        "z_std": math.sqrt(max(z_sq_sum / n_tok - (z_sum / n_tok) ** 2, 0.0)),
        "z_max": float(acc.z_max), "z_loss": z_sq_sum / n_tok,
        "vocab_specialization": float((vocab_spec * share).sum()), "vocab_specialization_blind": K / E,
        "collapsed": health["collapsed"], "status": health["status"],
        "experts": experts,
    }
    if K > 1:
        with_i = acc.coact.diagonal().clamp_min(1)
        cond = acc.coact / with_i.unsqueeze(1)  # P(j chosen | i chosen)
        cond.fill_diagonal_(0)
        rep["coactivation"] = acc.coact.round().long().tolist()
        pairs = [(i, j, float(cond[i, j]), int(acc.coact[i, j])) for i in range(E) for j in range(E) if i != j]
        pairs.sort(key=lambda x: -x[2])
        rep["top_coactivation"] = [{"a": i, "b": j, "p_b_given_a": p, "count": c} for i, j, p, c in pairs[:10]]
    return rep


@dataclass
class Stream:
    """A tokenised text stream cut into windows for batched forwards."""
    ids: torch.Tensor
    seq_len: int

    def batches(self, batch_size: int):
        n = self.ids.numel() // self.seq_len
        x = self.ids[: n * self.seq_len].view(n, self.seq_len)
        for i in range(0, n, batch_size):
            yield x[i: i + batch_size]


@torch.no_grad()
def run_routing(model, stream: Stream, batch_size: int, capacity_factor: float, keep_idx: bool = False):
    """Forward the stream; returns {layer: LayerAcc} (and {layer: [idx_TK ...]} with keep_idx)."""
    moe_layers = model.moe_layers
    V = model.recipe.model.vocab_size
    accs = {i: LayerAcc(m.cfg.num_experts, m.cfg.top_k, V, m.cfg.score_func == "softmax") for i, m in moe_layers}
    kept: dict[int, list[torch.Tensor]] = {i: [] for i, _ in moe_layers}
    model.eval()
    for i, m in moe_layers:
        m.capture, m.saliency = True, accs[i].saliency
    try:
        for x in stream.batches(batch_size):
            model(x)
            flat = x.reshape(-1)
            for i, m in moe_layers:
                route = m.last_route.detached_cpu()  # a copy where the model is not on the CPU
                accs[i].add(route, flat, capacity_factor)
                if keep_idx:
                    kept[i].append(route.idx_TK.clone())
    finally:
        for _, m in moe_layers:
            m.capture, m.saliency = False, None
            m.last_route = None
    return accs, kept


@torch.no_grad()
def run_routing_streamed(reader, stream: Stream, batch_size: int, capacity_factor: float):
    """run_routing for a model read one layer at a time (layerwise.stream_forward): the same statistics."""
    V = reader.recipe.model.vocab_size
    m = reader.recipe.moe
    accs = {i: LayerAcc(m.num_experts, m.top_k, V, m.score_func == "softmax")
            for i in reader.recipe.moe_layer_indices()}
    batches = list(stream.batches(batch_size))

    def on_moe(i, b, route):
        accs[i].add(route.detached_cpu(), batches[b].reshape(-1), capacity_factor)

    with tempfile.TemporaryDirectory(prefix="moe-routing-") as tmp:
        for _ in stream_forward(reader, batches, Path(tmp), on_moe, {i: a.saliency for i, a in accs.items()}):
            pass
    return accs, {}


@dataclass
class RoutingOptions:
    """moe inspect-routing's options (the CLI's flags, their defaults)."""
    max_tokens: int = 65536  # read at most this many tokens
    seq_len: int | None = None  # window length (None: as moe eval's)
    batch_size: int | None = None  # windows per forward (None: about BATCH_TOKENS' worth, at most 8)
    capacity_factor: float = 1.25  # for the dropped-token fraction
    top_tokens: int = 5  # tokens listed per expert
    near_dead: float = 0.1  # load (x uniform) below which an expert is near-dead
    domains: list[str] | None = None  # NAME=FILE: domain specialisation
    compare: str | None = None  # another checkpoint of the run: router saturation
    dtype: str = "float32"
    jsonl_field: str = JSONL_FIELD
    device: str = "cpu"
    stream: bool = False  # read one layer at a time

    def check(self) -> None:
        if self.batch_size is not None:
            check_at_least("--batch-size", self.batch_size, 1)
        check_at_least("--capacity-factor", self.capacity_factor, 0)
        check_at_least("--top-tokens", self.top_tokens, 0)
        check_at_least("--near-dead", self.near_dead, 0)


def inspect_routing(checkpoint: str, data: list[str], opts: RoutingOptions | None = None, **options) -> dict:
    """The routing report of ``checkpoint`` on DATA (none: the run's validation split); ``opts``, or its fields
    as keywords."""
    o = opts or RoutingOptions(**options)
    o.check()
    named = parse_domains(o.domains or [])  # before any work: a bad --domain should not wait for the routing
    model, ckpt, tok, streamed, torch_dtype, dev = _open_model(checkpoint, o, named)
    seq_len, why, ids, where = _routing_tokens(model, ckpt, tok, data, o)
    batch_size = o.batch_size or default_batch(seq_len, 8)
    stream = Stream(ids, seq_len)
    if streamed:
        accs, kept = run_routing_streamed(model, stream, batch_size, o.capacity_factor)
    else:
        accs, kept = run_routing(model, stream, batch_size, o.capacity_factor, keep_idx=o.compare is not None)
    layers = {str(i): layer_report(a, tok, o.top_tokens, o.near_dead, o.capacity_factor) for i, a in accs.items()}
    result = {
        "checkpoint": str(ckpt.directory), "recipe": model.recipe.name, "data": where,
        "tokens": int(stream.ids.numel() // seq_len * seq_len),
        "seq_len": seq_len, "seq_len_from": why, "batch_size": batch_size, "capacity_factor": o.capacity_factor,
        "near_dead_threshold": o.near_dead, "dtype": dtype_name(torch_dtype),
        "device": str(dev),
        "layers": layers,
        "flagged": {k: v["status"] for k, v in layers.items() if v["status"] != "ok"},
    }
    if streamed:
        result["streamed"] = {"why": streamed, **stream_plan(model.recipe, torch_dtype, batch_size * seq_len)}
    if named:
        result["domains"] = domain_report(model, tok, named, seq_len, batch_size, o.max_tokens, o.jsonl_field)
    if o.compare:
        result["saturation"] = saturation(o.compare, stream, batch_size, kept, torch_dtype, dev)
    return result


def _open_model(checkpoint: str, o: RoutingOptions, named: dict):
    """(model or layer reader, checkpoint, tokenizer, why streamed or None, dtype, device); a dense model, or
    --domain / --compare with streaming, refused before the weights are read."""
    ckpt, torch_dtype, dev = open_to_run(checkpoint, o.dtype, o.device)
    streamed = why_stream(ckpt.recipe, torch_dtype, o.stream)
    if streamed and (named or o.compare):
        raise UserError(f"{'--domain' if named else '--compare'}: not with a model read one layer at a time "
                        f"({streamed})")
    if not ckpt.recipe.moe_layer_indices():
        raise UserError(f"{checkpoint}: has no MoE layers (a dense model); nothing to inspect")
    model, tok = ckpt.model_and_tokenizer(torch_dtype, dev, streamed=bool(streamed))
    return model, ckpt, tok, streamed, torch_dtype, dev


def _routing_tokens(model, ckpt, tok, data: list[str], o: RoutingOptions):
    """(window, why that window, token ids, where they are from): DATA, or the split the run held out."""
    ctx = model.recipe.model.context
    seq_len, max_tokens = o.seq_len, o.max_tokens
    check_at_least("--max-tokens", max_tokens, 1)
    if seq_len is not None and not 1 <= seq_len <= ctx:
        raise UserError(f"--seq-len: must be between 1 and the model's context ({ctx}), got {seq_len}")
    if seq_len is not None and max_tokens < seq_len:
        raise UserError(f"--max-tokens: must be >= --seq-len ({seq_len}), got {max_tokens}")
    if data:
        ids, where = read_tokens(data, tok, max_tokens, o.jsonl_field), ", ".join(data)
    else:  # no DATA: the split the training run held out for validation
        tails, _, where = run_val_split(ckpt.directory, model.recipe, tok)
        # a run that mixed sources (--data-weights): an equal share of each source's tail
        ids = torch.cat([t[: max(1, max_tokens // len(tails))] for t in tails]).long()
    why = "--seq-len"
    if seq_len is None:
        seq_len, why = default_window(model.recipe, ids.numel(), ckpt.is_hf)
    if ids.numel() < seq_len:
        raise UserError(f"{where}: only {ids.numel()} tokens; need at least --seq-len {seq_len}")
    return seq_len, why, ids, where


def parse_domains(specs: list[str]) -> dict[str, str]:
    """--domain NAME=FILE, repeatable -> {name: file}; a missing name or file, or a name given twice, is bad
    input (the second would silently replace the first's report)."""
    named: dict[str, str] = {}
    for spec in specs:
        name, eq, path = spec.partition("=")
        if not eq or not name.strip() or not path:
            raise UserError(f"--domain {spec}: expected NAME=FILE")
        if name in named:
            raise UserError(f"--domain {spec}: the name {name!r} is given twice")
        named[name] = path
    return named


def domain_report(model, tok, domains: dict[str, str], seq_len: int, batch_size: int, max_tokens: int,
                  jsonl_field: str = JSONL_FIELD) -> dict:
    """Each domain's expert shares and lift (share x E) per layer; ``domains`` from parse_domains."""
    out: dict[str, dict] = {}
    for name, path in domains.items():
        ids = read_tokens([path], tok, max_tokens, jsonl_field)
        if ids.numel() < seq_len:
            raise UserError(f"--domain {name}={path}: only {ids.numel()} tokens; need at least {seq_len}")
        accs, _ = run_routing(model, Stream(ids, seq_len), batch_size, 0.0)
        for i, a in accs.items():
            share = (a.load.double() / max(a.tokens * a.K, 1))
            out.setdefault(str(i), {})[name] = {"share": share.tolist(), "lift": (share * a.E).tolist(),
                                                 "tokens": a.tokens}
    return out


def saturation(other: str, stream: Stream, batch_size: int, kept: dict[int, list[torch.Tensor]],
               dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> dict:
    """Top-k overlap between this checkpoint's routing and another's on the same tokens, per layer (the other
    model computes on `device`, as this one did)."""
    model_b, _ = load_checkpoint(other, dtype)
    model_b.to(device)
    layers_b = dict(model_b.moe_layers)
    if sorted(layers_b) != sorted(kept):
        raise UserError(f"{other}: MoE layers {sorted(layers_b)} differ from {sorted(kept)}; not the same run")
    _, kept_b = run_routing(model_b, stream, batch_size, 0.0, keep_idx=True)
    out = {}
    for i in kept:
        a = torch.cat(kept[i])
        b = torch.cat(kept_b[i])
        if a.shape != b.shape:
            raise UserError(f"{other}: layer {i} routes to {b.shape[1]} experts per token, this one to {a.shape[1]}")
        E = int(max(a.max(), b.max())) + 1
        ha = torch.zeros(a.shape[0], E).scatter_(1, a, 1.0)
        hb = torch.zeros(b.shape[0], E).scatter_(1, b, 1.0)
        overlap = (ha * hb).sum(1) / a.shape[1]
        out[str(i)] = {"topk_overlap": float(overlap.mean()), "top1_agreement": float((a[:, 0] == b[:, 0]).float().mean())}
    return {"other": str(other), "layers": out}
