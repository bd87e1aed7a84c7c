"""OLMoE (model_type olmoe), read only: RMSNorm over the whole q and k projections (not per head), MoE layers of
softmax top-k experts (norm_topk_prob) under mlp, every layer MoE. Not written: export and upcycle have no olmoe
format."""

from .qwen3_moe import EXPERT_WEIGHTS, MOE_PREFIX  # noqa: F401 (the Qwen-MoE expert names)

MODEL_TYPE = "olmoe"
ARCHITECTURE = "OlmoeForCausalLM"
MOE = True
WRITABLE = False


def recipe_parts(cfg: dict, model: dict, count, source: str) -> tuple[dict, dict, dict]:
    moe = {"num_experts": count("num_experts", "num_local_experts"), "top_k": count("num_experts_per_tok"),
           "expert_ffn": model["ffn_dim"], "renormalize": bool(cfg.get("norm_topk_prob", False))}
    return {**model, "qk_norm_full": True}, moe, {"aux_loss_coef": cfg.get("router_aux_loss_coef", 0.0)}


def config(recipe) -> dict:
    return {}


def cannot_express(recipe) -> list[str]:
    return ["anything: olmoe is read only"]
