"""Total vs active parameter accounting.

Active parameters are those one token touches: everything except the routed
experts it is not sent to, i.e. per MoE layer only top_k of num_experts routed
experts count (shared experts always count). Counted from the module tree, so
it stays right for any recipe: a built model's own, or one block of each kind on the meta device.
"""

from __future__ import annotations

from moecli.config import Recipe
from moecli.model.transformer import Transformer, meta_block


def _n(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _layer_row(block, i: int, r) -> dict:
    """One block's row of the report: its attention (with the block's norms) and FFN, total and active."""
    attn = _n(block.attention) + _n(block.attention_norm) + _n(block.ffn_norm)
    row = {"layer": i, "kind": "moe" if block.is_moe else "dense", "attention": attn,
           "attention_type": _attention_type(r, i)}
    if block.is_moe:
        moe = block.moe
        routed = _n(moe.experts)
        per_expert = routed // r.moe.num_experts
        other = _n(moe) - routed  # router, shared experts, shared gate
        row.update(
            experts=r.moe.num_experts, top_k=r.moe.top_k, shared=r.moe.num_shared_experts,
            ffn_total=routed + other, ffn_active=per_expert * r.moe.top_k + other, routed=routed,
        )
    else:
        n = _n(block.feed_forward)
        row.update(experts=0, top_k=0, shared=0, ffn_total=n, ffn_active=n)
    row["total"] = attn + row["ffn_total"]
    row["active"] = attn + row["ffn_active"]
    return row


def _attention_type(r, i: int) -> str:
    """Layer i's attention: mla, or GQA's full | sliding | chunked | nope (model.layer_types)."""
    return "mla" if r.model.attention == "mla" else r.model.layer_type(i)


def _report(emb: int, out: int, final_norm: int, layers: list[dict]) -> dict:
    total = emb + out + final_norm + sum(l["total"] for l in layers)
    active = emb + out + final_norm + sum(l["active"] for l in layers)
    return {
        "total": total,
        "active": active,
        "embedding": emb + out,
        "total_non_embedding": total - emb - out,
        "active_non_embedding": active - emb - out,
        "active_fraction": active / total,
        "layers": layers,
    }


def parameter_report(model: Transformer) -> dict:
    """Total vs active parameters of a built (or meta) model, per layer and in all."""
    r = model.recipe
    emb = model.tok_embeddings.weight.numel()
    out = 0 if r.model.tie_embeddings else model.output.weight.numel()
    report = _report(emb, out, _n(model.norm), [_layer_row(b, i, r) for i, b in enumerate(model.layers)])
    assert report["total"] == _n(model), "parameter accounting missed a module"
    return report


def recipe_parameter_report(recipe) -> dict:
    """parameter_report of the recipe's model without building it: one block of each kind (dense or MoE, attention
    or linear) is built on the meta device and counted, and every layer of that kind counts the same, so a recipe of
    any depth (100,000 layers) is measured in milliseconds. Equal to parameter_report(meta_model(recipe)) (tested)."""
    m = recipe.model
    rows: dict[bool, dict] = {}
    layers = []
    for i in range(m.n_layers):
        kind = (recipe.is_moe_layer(i), m.layer_type(i) == "linear")  # blocks differ by FFN and by token mixer
        if kind not in rows:
            rows[kind] = _layer_row(meta_block(recipe, i), i, recipe)
        layers.append({**rows[kind], "layer": i, "attention_type": _attention_type(recipe, i)})
    emb = m.vocab_size * m.d_model
    return _report(emb, 0 if m.tie_embeddings else emb, m.d_model, layers)


def param_counts(recipe: Recipe) -> tuple[int, int]:
    """(all parameters, the routed experts' share) of the recipe's model, without building it
    (params.recipe_parameter_report): a recipe of any size is measured before anything is allocated."""
    rep = recipe_parameter_report(recipe)
    return rep["total"], sum(row.get("routed", 0) for row in rep["layers"])
