"""Qwen3-MoE (model_type qwen3_moe): Qwen3's attention (per-head q/k norm), MoE layers of softmax top-k experts
(norm_topk_prob), dense layers listed in mlp_only_layers (leading ones only) and decoder_sparse_step.

Tensor names (moecli <- Hugging Face model.layers.i.mlp.): moe.router.gate <- gate; experts (3D) <-
experts.E.gate_proj|up_proj|down_proj (or fused). Cannot express: sigmoid scores, routed scaling, group-limited
routing, a capacity factor, aux-loss-free biases, shared experts, an attention layout other than Qwen3's, MoE every
n-th layer (written: first layers dense only).
"""

from moecli.errors import UserError
from .base import softmax_moe_problems

MODEL_TYPE = "qwen3_moe"
ARCHITECTURE = "Qwen3MoeForCausalLM"
MOE = True
WRITABLE = True
MOE_PREFIX = "mlp"
EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj")


def qwen_moe_parts(cfg: dict, model: dict, count, source: str) -> dict:
    """The moe section of a Qwen-MoE config (Qwen2-MoE's and Qwen3-MoE's)."""
    moe = {"num_experts": count("num_experts", "num_local_experts"), "top_k": count("num_experts_per_tok"),
           "expert_ffn": count("moe_intermediate_size"), "renormalize": bool(cfg.get("norm_topk_prob", False))}
    step = cfg.get("decoder_sparse_step", 1) or 1
    dense_layers = sorted(cfg.get("mlp_only_layers") or [])
    if dense_layers and (step != 1 or dense_layers != list(range(len(dense_layers)))):
        raise UserError(f"{source}: mlp_only_layers {dense_layers} with decoder_sparse_step {step} is not a "
                        "layout moecli supports (first k layers dense, then every n-th)")
    return {**moe, "first_k_dense": len(dense_layers), "moe_every_n": step}


def qwen_moe_config(recipe, mt: str) -> dict:
    r, m = recipe.model, recipe.moe
    if m.moe_every_n != 1:
        raise UserError(f"--format {mt}: moe_every_n > 1 is not written for {mt}; use first_k_dense")
    return {"num_experts": m.num_experts, "num_local_experts": m.num_experts, "num_experts_per_tok": m.top_k,
            "moe_intermediate_size": m.expert_ffn, "norm_topk_prob": m.renormalize, "decoder_sparse_step": 1,
            "mlp_only_layers": [i for i in range(r.n_layers) if not recipe.is_moe_layer(i)],
            "router_aux_loss_coef": recipe.balance.aux_loss_coef, "output_router_logits": False}


def recipe_parts(cfg: dict, model: dict, count, source: str) -> tuple[dict, dict, dict]:
    return ({**model, "qk_norm": True}, qwen_moe_parts(cfg, model, count, source),
            {"aux_loss_coef": cfg.get("router_aux_loss_coef", 0.0)})


def config(recipe) -> dict:
    return {"attention_bias": False, **qwen_moe_config(recipe, MODEL_TYPE)}


def cannot_express(recipe) -> list[str]:
    m, r = recipe.moe, recipe.model
    problems = softmax_moe_problems(recipe)
    if m.num_shared_experts or not r.qk_norm or r.qkv_bias:
        problems.append("shared experts" if m.num_shared_experts else "an attention layout other than Qwen3's")
    return problems
