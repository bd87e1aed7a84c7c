"""GLM-4.5 / GLM-4.6 (transformers' Glm4MoeForCausalLM, model_type glm4_moe).

Architecture, against the Llama body hf.py shares:
    attention  GQA with q/k/v biases (attention_bias), optional per-head q/k RMSNorm (use_qk_norm), and
               partial RoPE: the first partial_rotary_factor (0.5) of each head's dims rotate
    MoE        DeepSeek-V3's router: sigmoid scores, e_score_correction_bias added for selection only
               (moecli's expert_bias), n_group / topk_group group-limited selection (a group scores the sum of
               its top-2), norm_topk_prob, routed_scaling_factor; n_shared_experts x moe_intermediate_size always on
    layout     the first first_k_dense_replace layers dense (intermediate_size), the rest MoE

Tensor names (moecli <- Hugging Face), beside the Llama ones:
    layers.i.moe.router.expert_bias    model.layers.i.mlp.gate.e_score_correction_bias
    layers.i.moe.shared.w1|w3|w2       model.layers.i.mlp.shared_experts.gate_proj|up_proj|down_proj
    layers.i.moe.experts (3D)          model.layers.i.mlp.experts.E.gate_proj|up_proj|down_proj (or fused)

Read past: multi-token-prediction layers (num_nextn_predict_layers: layers numbered from num_hidden_layers).
Cannot express: softmax scores, a capacity factor, a gated shared expert, MoE every n-th layer, OLMoE's q/k norm,
a shared expert of another width than n_shared_experts x moe_intermediate_size.
"""

from __future__ import annotations

MODEL_TYPE = "glm4_moe"
ARCHITECTURE = "Glm4MoeForCausalLM"


def recipe_parts(cfg: dict, model: dict, count, source: str) -> tuple[dict, dict, dict]:
    """(model, moe, balance) recipe sections from a glm4_moe config; ``model`` holds the fields hf.py reads for
    every family, ``count(key)`` a size the config must hold."""
    model = {**model, "qkv_bias": bool(cfg.get("attention_bias", False)), "qk_norm": bool(cfg.get("use_qk_norm", False))}
    shared = cfg.get("n_shared_experts") or 0
    moe = {"num_experts": count("n_routed_experts"), "top_k": count("num_experts_per_tok"),
           "expert_ffn": count("moe_intermediate_size"), "num_shared_experts": shared,
           "score_func": "sigmoid", "renormalize": bool(cfg.get("norm_topk_prob", True)),
           "routed_scaling": float(cfg.get("routed_scaling_factor", 1.0)),
           "n_groups": cfg.get("n_group") or 1, "topk_groups": cfg.get("topk_group") or 1,
           "first_k_dense": cfg.get("first_k_dense_replace") or 0}
    return model, moe, {}


def config(recipe) -> dict:
    """The glm4_moe keys of config.json (hf.py writes the shared ones)."""
    r, m = recipe.model, recipe.moe
    return {"attention_bias": r.qkv_bias, "use_qk_norm": r.qk_norm, "partial_rotary_factor": r.rope_partial,
            "n_routed_experts": m.num_experts, "num_experts_per_tok": m.top_k, "moe_intermediate_size": m.expert_ffn,
            "n_shared_experts": m.num_shared_experts, "norm_topk_prob": m.renormalize,
            "routed_scaling_factor": m.routed_scaling, "n_group": m.n_groups, "topk_group": m.topk_groups,
            "first_k_dense_replace": m.first_k_dense, "num_nextn_predict_layers": 0}


def name_map(recipe, names: dict[str, str]) -> dict[str, str]:
    """hf.py's moecli -> Hugging Face names with glm4_moe's router bias and shared experts."""
    for i in recipe.moe_layers():
        P = f"model.layers.{i}.mlp"
        names[f"layers.{i}.moe.router.expert_bias"] = f"{P}.gate.e_score_correction_bias"
        for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            if f"layers.{i}.moe.shared.{ours}.weight" in names:
                names[f"layers.{i}.moe.shared.{ours}.weight"] = f"{P}.shared_experts.{theirs}.weight"
    return names


def cannot_express(recipe) -> list[str]:
    r, m = recipe.model, recipe.moe
    problems = []
    if m.score_func != "sigmoid":
        problems.append("softmax scores (glm4_moe routes by sigmoid)")
    if m.shared_gate:
        problems.append("a gated shared expert")
    if m.num_shared_experts and m.shared_hidden != m.expert_ffn * m.num_shared_experts:
        problems.append(f"a shared expert of width {m.shared_hidden} (glm4_moe: n_shared_experts x expert_ffn)")
    if m.moe_every_n != 1:
        problems.append("MoE every n-th layer")
    if r.qk_norm_full:
        problems.append("OLMoE-style q/k norm")
    if m.capacity_factor > 0:
        problems.append("a capacity factor")
    return problems


def empty_tensors(recipe, i: int) -> list[tuple[str, tuple[int, int]]]:
    """Tensors glm4_moe always holds that this model has none of: a zero-width shared expert."""
    if recipe.moe.num_shared_experts:
        return []
    D, P = recipe.model.d_model, f"model.layers.{i}.mlp.shared_experts"
    return [(f"{P}.gate_proj.weight", (0, D)), (f"{P}.up_proj.weight", (0, D)), (f"{P}.down_proj.weight", (D, 0))]
