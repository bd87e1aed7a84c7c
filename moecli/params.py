"""Total vs active parameter accounting.

Active parameters are those one token touches: everything except the routed
experts it is not sent to, i.e. per MoE layer only top_k of num_experts routed
experts count (shared experts always count). Counted from the module tree, so
it stays right for any recipe.
"""

from __future__ import annotations

from .model import Transformer


def _n(module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_report(model: Transformer) -> dict:
    r = model.recipe
    emb = model.tok_embeddings.weight.numel()
    out = 0 if r.model.tie_embeddings else model.output.weight.numel()
    layers = []
    for i, block in enumerate(model.layers):
        attn = _n(block.attention) + _n(block.attention_norm) + _n(block.ffn_norm)
        row = {"layer": i, "kind": "moe" if block.is_moe else "dense", "attention": attn}
        if block.is_moe:
            moe = block.moe
            routed = _n(moe.experts)
            per_expert = routed // r.moe.num_experts
            other = _n(moe) - routed  # router, shared experts, shared gate
            row.update(
                experts=r.moe.num_experts, top_k=r.moe.top_k, shared=r.moe.num_shared_experts,
                ffn_total=routed + other, ffn_active=per_expert * r.moe.top_k + other,
            )
        else:
            n = _n(block.feed_forward)
            row.update(experts=0, top_k=0, shared=0, ffn_total=n, ffn_active=n)
        row["total"] = attn + row["ffn_total"]
        row["active"] = attn + row["ffn_active"]
        layers.append(row)
    final_norm = _n(model.norm)
    total = emb + out + final_norm + sum(l["total"] for l in layers)
    active = emb + out + final_norm + sum(l["active"] for l in layers)
    assert total == _n(model), "parameter accounting missed a module"
    return {
        "total": total,
        "active": active,
        "embedding": emb + out,
        "total_non_embedding": total - emb - out,
        "active_non_embedding": active - emb - out,
        "active_fraction": active / total,
        "layers": layers,
    }
