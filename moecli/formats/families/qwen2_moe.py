"""Qwen2-MoE / Qwen1.5-MoE (model_type qwen2_moe): Qwen2's attention (q/k/v biases), Qwen-MoE layers (see
qwen3_moe.py) and a shared expert of shared_expert_intermediate_size scaled by a sigmoid gate.

Tensor names beside Qwen3-MoE's (moecli <- Hugging Face model.layers.i.mlp.): moe.shared.w1|w3|w2 <-
shared_expert.gate_proj|up_proj|down_proj, moe.shared_gate <- shared_expert_gate. A model without a shared expert is
written with an empty one (zero width, zero gate). Cannot express: as Qwen3-MoE, plus an ungated shared expert and
an attention layout other than Qwen2's.
"""

from .base import softmax_moe_problems
from .qwen3_moe import EXPERT_WEIGHTS, MOE_PREFIX, qwen_moe_config, qwen_moe_parts  # noqa: F401 (EXPERT_WEIGHTS)

MODEL_TYPE = "qwen2_moe"
ARCHITECTURE = "Qwen2MoeForCausalLM"
MOE = True
WRITABLE = True
ATTENTION_BIAS = True


def shared_expert_parts(cfg: dict, moe: dict) -> dict:
    """The moe section with the config's sigmoid-gated shared expert (shared_expert_intermediate_size; 0: none);
    Qwen3-Next's is the same."""
    shared = cfg.get("shared_expert_intermediate_size", 0)
    return {**moe, "num_shared_experts": 1, "shared_ffn": shared, "shared_gate": True} if shared else moe


def recipe_parts(cfg: dict, model: dict, count, source: str) -> tuple[dict, dict, dict]:
    moe = shared_expert_parts(cfg, qwen_moe_parts(cfg, model, count, source))
    return ({**model, "qkv_bias": bool(cfg.get("qkv_bias", True))}, moe,
            {"aux_loss_coef": cfg.get("router_aux_loss_coef", 0.0)})


def config(recipe) -> dict:
    m = recipe.moe
    return {**qwen_moe_config(recipe, MODEL_TYPE), "qkv_bias": True,
            "shared_expert_intermediate_size": m.shared_hidden if m.num_shared_experts else 0}


def name_map(recipe, names: dict[str, str]) -> dict[str, str]:
    for i in recipe.moe_layer_indices():
        P = f"model.layers.{i}.mlp"
        if recipe.moe.num_shared_experts:
            for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                names[f"layers.{i}.moe.shared.{ours}.weight"] = f"{P}.shared_expert.{theirs}.weight"
        if recipe.moe.shared_gate:
            names[f"layers.{i}.moe.shared_gate.weight"] = f"{P}.shared_expert_gate.weight"
    return names


def cannot_express(recipe) -> list[str]:
    m, r = recipe.moe, recipe.model
    problems = softmax_moe_problems(recipe)
    if m.num_shared_experts and not m.shared_gate:
        problems.append("an ungated shared expert")
    if r.qk_norm or not r.qkv_bias:
        problems.append("an attention layout other than Qwen2's")
    return problems


def empty_tensors(recipe, i: int) -> list[tuple[str, tuple[int, int]]]:
    """Qwen2-MoE always has a shared expert: a model without one gets it empty (zero width, zero gate)."""
    if recipe.moe.num_shared_experts:
        return []
    D, P = recipe.model.d_model, f"model.layers.{i}.mlp.shared_expert"
    return [(f"{P}.gate_proj.weight", (0, D)), (f"{P}.up_proj.weight", (0, D)), (f"{P}.down_proj.weight", (D, 0)),
            (f"{P}_gate.weight", (1, D))]
