"""GLM-4.5 / GLM-4.6 (transformers' Glm4MoeForCausalLM, model_type glm4_moe).

Architecture, against the Llama body hf.py shares:
    attention  GQA with q/k/v biases (attention_bias), optional per-head q/k RMSNorm (use_qk_norm), and
               partial RoPE: the first partial_rotary_factor (0.5) of each head's dims rotate
    MoE        DeepSeek-V3's router: sigmoid scores, e_score_correction_bias added for selection only
               (moecli's expert_bias), n_group / topk_group group-limited selection (a group scores the sum of
               its top-2), norm_topk_prob, routed_scaling_factor; n_shared_experts x moe_intermediate_size always on
    layout     the first first_k_dense_replace layers dense (intermediate_size), the rest MoE
The MoE's config keys and tensor names are DeepSeek-V3's (deepseek_v3.py), shared from there.

Tensor names (moecli <- Hugging Face), beside the Llama ones:
    layers.i.moe.router.expert_bias    model.layers.i.mlp.gate.e_score_correction_bias
    layers.i.moe.shared.w1|w3|w2       model.layers.i.mlp.shared_experts.gate_proj|up_proj|down_proj
    layers.i.moe.experts (3D)          model.layers.i.mlp.experts.E.gate_proj|up_proj|down_proj (or fused)

Read past: multi-token-prediction layers (num_nextn_predict_layers: layers numbered from num_hidden_layers).
Cannot express: softmax scores, a capacity factor, a gated shared expert, MoE every n-th layer, OLMoE's q/k norm,
a shared expert of another width than n_shared_experts x moe_intermediate_size.
"""

from __future__ import annotations

from .deepseek_v3 import EXPERT_WEIGHTS, empty_tensors, moe_config, moe_names, moe_parts, moe_problems  # noqa: F401 (re-exported)

MODEL_TYPE = "glm4_moe"
ARCHITECTURE = "Glm4MoeForCausalLM"
MOE = True
WRITABLE = True
ATTENTION_BIAS = True  # attention_bias read
MOE_PREFIX = "mlp"
EXPERT_BIAS = True  # holds aux-loss-free router biases (e_score_correction_bias)


def recipe_parts(cfg: dict, model: dict, count, source: str) -> tuple[dict, dict, dict]:
    """(model, moe, balance) recipe sections from a glm4_moe config; ``model`` holds the fields hf.py reads for
    every family, ``count(key)`` a size the config must hold."""
    model = {**model, "qkv_bias": bool(cfg.get("attention_bias", False)), "qk_norm": bool(cfg.get("use_qk_norm", False))}
    return model, moe_parts(cfg, count), {}


def config(recipe) -> dict:
    """The glm4_moe keys of config.json (hf.py writes the shared ones)."""
    r = recipe.model
    return {"attention_bias": r.qkv_bias, "use_qk_norm": r.qk_norm, "partial_rotary_factor": r.rope_partial,
            **moe_config(recipe)}


def name_map(recipe, names: dict[str, str]) -> dict[str, str]:
    """hf.py's moecli -> Hugging Face names with the router bias and shared experts of DeepSeek-V3's MoE."""
    return moe_names(recipe, names)


def cannot_express(recipe) -> list[str]:
    r = recipe.model
    problems = moe_problems(recipe)
    if r.attention != "gqa":
        problems.append("MLA attention (glm4_moe is GQA)")
    if r.qk_norm_full:
        problems.append("OLMoE-style q/k norm")
    return problems
