"""Mixtral (model_type mixtral): Llama's attention, every layer's FFN an MoE of num_local_experts SwiGLU experts under
``block_sparse_moe``, softmax top-k renormalised (always), no shared expert.

Tensor names (moecli <- Hugging Face model.layers.i.block_sparse_moe.): moe.router.gate <- gate;
experts (3D) <- experts.E.w1|w3|w2 (or the fused gate_up_proj / down_proj of transformers 5); the MoE under mlp.
instead of block_sparse_moe. (transformers 5's names, mergekit-moe's output) is read too.
Cannot express: sigmoid scores, routed scaling, group-limited routing, a capacity factor, aux-loss-free biases,
un-renormalised top-k, shared experts, dense layers, q/k/v biases or q/k norm.
"""

from .base import softmax_moe_problems

MODEL_TYPE = "mixtral"
ARCHITECTURE = "MixtralForCausalLM"
MOE = True
WRITABLE = True
MOE_PREFIX = "block_sparse_moe"
EXPERT_WEIGHTS = ("w1", "w3", "w2")  # an expert's gate, up and down projections


def alias(name: str) -> str:
    """transformers 5's layout (and mergekit-moe's output) holds the MoE under mlp: read it as block_sparse_moe."""
    return name.replace(".mlp.gate.", ".block_sparse_moe.gate.").replace(".mlp.experts.", ".block_sparse_moe.experts.")


def recipe_parts(cfg: dict, model: dict, count, source: str) -> tuple[dict, dict, dict]:
    moe = {"num_experts": count("num_local_experts"), "top_k": count("num_experts_per_tok"),
           "expert_ffn": model["ffn_dim"], "renormalize": True}
    return model, moe, {"aux_loss_coef": cfg.get("router_aux_loss_coef", 0.0)}


def config(recipe) -> dict:
    m = recipe.moe
    return {"attention_bias": False, "num_local_experts": m.num_experts, "num_experts_per_tok": m.top_k,
            "intermediate_size": m.expert_ffn, "router_aux_loss_coef": recipe.balance.aux_loss_coef,
            "router_jitter_noise": 0.0}


def cannot_express(recipe) -> list[str]:
    m = recipe.moe
    problems = softmax_moe_problems(recipe)
    if not m.renormalize:
        problems.append("un-renormalised top-k")
    if m.num_shared_experts:
        problems.append("shared experts")
    if m.first_k_dense or m.moe_every_n != 1:
        problems.append("dense layers")
    if recipe.model.qkv_bias or recipe.model.qk_norm:
        problems.append("q/k/v bias or q/k norm")
    return problems
