"""DeepSeek-V3 and Kimi K2 (transformers' DeepseekV3ForCausalLM; model_type deepseek_v3, and kimi_k2 for Kimi K2's
checkpoints, which use this layout).

Architecture, against the Llama body hf.py shares:
    attention  multi-head latent attention (attention.MLAttention): q_lora_rank (null: one q projection),
               kv_lora_rank, qk_nope_head_dim / qk_rope_head_dim / v_head_dim, the shared rope key, rope_interleave,
               attention_bias on q_a/kv_a/o; YaRN with mscale / mscale_all_dim (model/rope.py)
    MoE        sigmoid scores, e_score_correction_bias added for selection only (moecli's expert_bias), n_group /
               topk_group (a group scores the sum of its top-2), norm_topk_prob, routed_scaling_factor;
               n_shared_experts x moe_intermediate_size always on
    layout     the first first_k_dense_replace layers dense (intermediate_size), the rest MoE

Tensor names (moecli <- Hugging Face model.layers.i.):
    attention.wq | wq_a, q_norm, wq_b          self_attn.q_proj | q_a_proj, q_a_layernorm, q_b_proj
    attention.wkv_a, kv_norm, wkv_b, wo        self_attn.kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj
    moe.router.gate, expert_bias               mlp.gate.weight, mlp.gate.e_score_correction_bias
    moe.shared.w1|w3|w2                        mlp.shared_experts.gate_proj|up_proj|down_proj
    moe.experts (3D)                           mlp.experts.E.gate_proj|up_proj|down_proj (or fused)

Read past: multi-token-prediction layers (num_nextn_predict_layers: layers numbered from num_hidden_layers).
Cannot express: GQA attention, softmax scores, a capacity factor, a gated shared expert, MoE every n-th layer,
q/k norm, partial rotary, a shared expert of another width than n_shared_experts x moe_intermediate_size.
"""

from __future__ import annotations

MODEL_TYPE = "deepseek_v3"
ARCHITECTURE = "DeepseekV3ForCausalLM"
READ_AS = ("kimi_k2",)  # other model_types in this layout, read (and written back as deepseek_v3)
MOE = True
WRITABLE = True
ATTENTION_BIAS = True  # attention_bias read
MOE_PREFIX = "mlp"
EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj")
EXPERT_BIAS = True  # holds aux-loss-free router biases (e_score_correction_bias)

_MLA_NAMES = (("wq", "q_proj"), ("wq_a", "q_a_proj"), ("q_norm", "q_a_layernorm"), ("wq_b", "q_b_proj"),
              ("wkv_a", "kv_a_proj_with_mqa"), ("kv_norm", "kv_a_layernorm"), ("wkv_b", "kv_b_proj"), ("wo", "o_proj"))
_BIASED = ("wq_a", "wkv_a", "wo")  # attention_bias


# ---------------------------------------------------------------- DeepSeek-V3's MoE (GLM-4.5 shares it)

def moe_parts(cfg: dict, count) -> dict:
    """The moe recipe section of a DeepSeek-V3-style config."""
    return {"num_experts": count("n_routed_experts"), "top_k": count("num_experts_per_tok"),
            "expert_ffn": count("moe_intermediate_size"), "num_shared_experts": cfg.get("n_shared_experts") or 0,
            "score_func": "sigmoid", "renormalize": bool(cfg.get("norm_topk_prob", True)),
            "routed_scaling": float(cfg.get("routed_scaling_factor", 1.0)),
            "n_groups": cfg.get("n_group") or 1, "topk_groups": cfg.get("topk_group") or 1,
            "first_k_dense": cfg.get("first_k_dense_replace") or 0}


def moe_config(recipe) -> dict:
    m = recipe.moe
    return {"n_routed_experts": m.num_experts, "num_experts_per_tok": m.top_k, "moe_intermediate_size": m.expert_ffn,
            "n_shared_experts": m.num_shared_experts, "norm_topk_prob": m.renormalize,
            "routed_scaling_factor": m.routed_scaling, "n_group": m.n_groups, "topk_group": m.topk_groups,
            "first_k_dense_replace": m.first_k_dense, "num_nextn_predict_layers": 0}


def moe_names(recipe, names: dict[str, str], expert_bias: bool = True) -> dict[str, str]:
    """hf.py's names with the router bias (unless ``expert_bias`` is False: DeepSeek-V2) and the shared experts."""
    for i in recipe.moe_layer_indices():
        P = f"model.layers.{i}.mlp"
        if expert_bias:
            names[f"layers.{i}.moe.router.expert_bias"] = f"{P}.gate.e_score_correction_bias"
        for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            if recipe.moe.num_shared_experts:
                names[f"layers.{i}.moe.shared.{ours}.weight"] = f"{P}.shared_experts.{theirs}.weight"
    return names



def moe_problems(recipe, score_func: str = "sigmoid") -> list[str]:
    m = recipe.moe
    problems = []
    if m.score_func != score_func:
        problems.append(f"{m.score_func} scores (this family routes by {score_func})")
    if m.shared_gate:
        problems.append("a gated shared expert")
    if m.num_shared_experts and m.shared_hidden != m.expert_ffn * m.num_shared_experts:
        problems.append(f"a shared expert of width {m.shared_hidden} (n_shared_experts x expert_ffn)")
    if m.moe_every_n != 1:
        problems.append("MoE every n-th layer")
    if m.capacity_factor > 0:
        problems.append("a capacity factor")
    return problems


def empty_tensors(recipe, i: int) -> list[tuple[str, tuple[int, int]]]:
    """Tensors the family always holds that this model has none of: a zero-width shared expert."""
    if recipe.moe.num_shared_experts:
        return []
    D, P = recipe.model.d_model, f"model.layers.{i}.mlp.shared_experts"
    return [(f"{P}.gate_proj.weight", (0, D)), (f"{P}.up_proj.weight", (0, D)), (f"{P}.down_proj.weight", (D, 0))]


# ---------------------------------------------------------------- the family

def recipe_parts(cfg: dict, model: dict, count, source: str) -> tuple[dict, dict, dict]:
    model = {**model, **mla_parts(cfg, count), "rope_interleave": bool(cfg.get("rope_interleave", True))}
    return model, moe_parts(cfg, count), {}


def config(recipe) -> dict:
    return {**mla_config(recipe), "rope_interleave": recipe.model.rope_interleave, "scoring_func": "sigmoid",
            "topk_method": "noaux_tc", **moe_config(recipe)}


def mla_names(recipe, names: dict[str, str]) -> dict[str, str]:
    """hf.py's names with its GQA attention's replaced by MLA's (DeepSeek-V2 shares them)."""
    names = {k: v for k, v in names.items() if ".attention." not in k}
    for i in range(recipe.model.n_layers):
        L, H = f"layers.{i}.attention", f"model.layers.{i}.self_attn"
        for ours, theirs in _MLA_NAMES:
            if (ours == "wq") != (recipe.model.q_lora_rank == 0) and ours in ("wq", "wq_a", "q_norm", "wq_b"):
                continue
            names[f"{L}.{ours}.weight"] = f"{H}.{theirs}.weight"
            if recipe.model.qkv_bias and ours in _BIASED:
                names[f"{L}.{ours}.bias"] = f"{H}.{theirs}.bias"
    return names


def mla_parts(cfg: dict, count) -> dict:
    """The model recipe fields of a DeepSeek config's MLA."""
    return {"attention": "mla", "q_lora_rank": cfg.get("q_lora_rank") or 0, "kv_lora_rank": count("kv_lora_rank"),
            "qk_nope_head_dim": count("qk_nope_head_dim"), "qk_rope_head_dim": count("qk_rope_head_dim"),
            "v_head_dim": count("v_head_dim"), "qkv_bias": bool(cfg.get("attention_bias", False)), "head_dim": 0}


def mla_config(recipe) -> dict:
    r = recipe.model
    return {"q_lora_rank": r.q_lora_rank or None, "kv_lora_rank": r.kv_lora_rank,
            "qk_nope_head_dim": r.qk_nope_head_dim, "qk_rope_head_dim": r.qk_rope_head_dim,
            "v_head_dim": r.v_head_dim, "head_dim": r.qk_rope_head_dim, "attention_bias": r.qkv_bias,
            "num_key_value_heads": r.n_heads}


def mla_problems(recipe) -> list[str]:
    r = recipe.model
    problems = []
    if r.attention != "mla":
        problems.append("GQA attention (DeepSeek's is MLA)")
    if r.rope_partial != 1.0:
        problems.append("partial rotary")
    return problems


def name_map(recipe, names: dict[str, str]) -> dict[str, str]:
    return moe_names(recipe, mla_names(recipe, names))


def cannot_express(recipe) -> list[str]:
    return moe_problems(recipe) + mla_problems(recipe)
