"""Qwen3 (model_type qwen3): Llama's body with an RMSNorm over each head of q and k before RoPE, and an explicit
head_dim. Upcycled to Qwen3-MoE. Cannot express: q/k/v biases, attention without per-head q/k norm, MoE layers."""

from .llama import MOE_PREFIX, config  # noqa: F401 (the shared parts; the rest from base.py)

MODEL_TYPE = "qwen3"
ARCHITECTURE = "Qwen3ForCausalLM"
MOE = False
WRITABLE = True
UPCYCLE_TO = "qwen3_moe"


def recipe_parts(cfg: dict, model: dict, count, source: str) -> tuple[dict, dict, dict]:
    return {**model, "qk_norm": True}, {}, {}


def cannot_express(recipe) -> list[str]:
    r = recipe.model
    return ["q/k/v biases"] * r.qkv_bias + ["attention without per-head q/k norm"] * (not r.qk_norm or r.qk_norm_full)
