"""DeepSeek-V2 and V2-Lite (transformers' DeepseekV2ForCausalLM, model_type deepseek_v2).

Architecture, against DeepSeek-V3 (deepseek_v3.py, whose MLA names and config keys it shares):
    attention  the same multi-head latent attention; RoPE on pairs (2i, 2i+1) as complex numbers, which rotates
               what moecli's rope_interleave rotates (its output order differs, identically for q and k, so the
               attention is the same)
    MoE        softmax scores; topk_method greedy (plain top-k) or group_limited_greedy (the best topk_group of
               n_group groups, a group scoring its best expert); weights times routed_scaling_factor and not
               renormalised (transformers' DeepseekV2 ignores norm_topk_prob); no correction bias;
               n_shared_experts x moe_intermediate_size always on; first_k_dense_replace dense layers first

Cannot express: sigmoid scores, renormalised weights, aux-loss-free router biases, a capacity factor, a gated shared
expert, MoE every n-th layer, GQA attention, partial rotary, non-interleaved RoPE.
"""

from __future__ import annotations

from moecli.errors import UserError
from .deepseek_v3 import (EXPERT_WEIGHTS, empty_tensors, mla_config, mla_names, mla_parts,  # noqa: F401 (re-exported)
                          mla_problems, moe_names, moe_problems)

MODEL_TYPE = "deepseek_v2"
ARCHITECTURE = "DeepseekV2ForCausalLM"
MOE = True
WRITABLE = True
ATTENTION_BIAS = True  # attention_bias read
MOE_PREFIX = "mlp"


def recipe_parts(cfg: dict, model: dict, count, source: str) -> tuple[dict, dict, dict]:
    method = cfg.get("topk_method", "greedy")
    if method not in ("greedy", "group_limited_greedy"):
        raise UserError(f"{source}: topk_method: {method!r} is not supported (greedy, group_limited_greedy)")
    grouped = method == "group_limited_greedy"
    moe = {"num_experts": count("n_routed_experts"), "top_k": count("num_experts_per_tok"),
           "expert_ffn": count("moe_intermediate_size"), "num_shared_experts": cfg.get("n_shared_experts") or 0,
           "score_func": "softmax", "renormalize": False, "routed_scaling": float(cfg.get("routed_scaling_factor", 1.0)),
           "n_groups": count("n_group") if grouped else 1, "topk_groups": count("topk_group") if grouped else 1,
           "first_k_dense": cfg.get("first_k_dense_replace") or 0}
    return {**model, **mla_parts(cfg, count), "rope_interleave": True}, moe, {}


def config(recipe) -> dict:
    m = recipe.moe
    grouped = m.n_groups > 1 and m.topk_groups < m.n_groups
    return {**mla_config(recipe), "n_routed_experts": m.num_experts, "num_experts_per_tok": m.top_k,
            "moe_intermediate_size": m.expert_ffn, "n_shared_experts": m.num_shared_experts,
            "routed_scaling_factor": m.routed_scaling, "norm_topk_prob": False,
            "topk_method": "group_limited_greedy" if grouped else "greedy",
            "n_group": m.n_groups if grouped else None, "topk_group": m.topk_groups if grouped else None,
            "first_k_dense_replace": m.first_k_dense}


def name_map(recipe, names: dict[str, str]) -> dict[str, str]:
    return moe_names(recipe, mla_names(recipe, names), expert_bias=False)


def cannot_express(recipe) -> list[str]:
    problems = moe_problems(recipe, "softmax") + mla_problems(recipe)
    if recipe.moe.renormalize:
        problems.append("renormalised top-k weights")
    if not recipe.model.rope_interleave:
        problems.append("RoPE on halves (deepseek_v2 rotates pairs)")
    return problems
