"""Qwen2 / Qwen2.5 (model_type qwen2): Llama's body with q/k/v biases (qkv_bias, default on). Upcycled to
Qwen2-MoE. Cannot express: q/k norm, attention without q/k/v biases, MoE layers."""

from .llama import MOE_PREFIX  # noqa: F401 (the shared parts; the rest from base.py)

MODEL_TYPE = "qwen2"
ARCHITECTURE = "Qwen2ForCausalLM"
MOE = False
WRITABLE = True
UPCYCLE_TO = "qwen2_moe"
ATTENTION_BIAS = True


def recipe_parts(cfg: dict, model: dict, count, source: str) -> tuple[dict, dict, dict]:
    return {**model, "qkv_bias": bool(cfg.get("qkv_bias", True))}, {}, {}


def config(recipe) -> dict:
    return {}


def cannot_express(recipe) -> list[str]:
    r = recipe.model
    return ["q/k norm"] * bool(r.qk_norm or r.qk_norm_full) + ["attention without q/k/v biases"] * (not r.qkv_bias)
