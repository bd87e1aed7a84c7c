"""Qwen3-Next (model_type qwen3_next, transformers' Qwen3NextForCausalLM): Gated DeltaNet linear-attention layers
interleaved with gated full attention (layer_types of linear_attention / full_attention, 3:1 by default), Qwen-MoE
layers with a sigmoid-gated shared expert.

Architecture, against the Llama body hf.py shares:
    linear     deltanet.GatedDeltaNet: in_proj_qkvz / in_proj_ba, a causal depthwise conv1d (linear_conv_kernel_dim)
               with SiLU, L2-normed q/k, decay from A_log and dt_bias, beta, the chunked gated delta rule, a gated
               RMSNorm, out_proj; linear_num_key_heads / linear_num_value_heads, linear_key_head_dim /
               linear_value_head_dim
    full       q_proj twice as wide (each head's query and output gate), per-head q/k norm, partial rotary
               (partial_rotary_factor, 0.25 by default), the output times sigmoid(gate)
    norms      every RMSNorm but the DeltaNet's scales by (1 + weight) (zero-centred)
    MoE        softmax top-k (norm_topk_prob), a shared expert (shared_expert_intermediate_size) times
               sigmoid(shared_expert_gate); mlp_only_layers / decoder_sparse_step dense layers

Tensor names (moecli <- Hugging Face model.layers.i.): for linear layers attention.in_qkvz, in_ba, conv_C1K,
dt_bias_H, A_log_H, norm, wo <- linear_attn.in_proj_qkvz, in_proj_ba, conv1d, dt_bias, A_log, norm, out_proj; the
rest as Qwen3-MoE's and Qwen2-MoE's shared expert. Multi-token-prediction weights (mtp.*) are read past.
Cannot express: MLA, sliding / chunked / NoPE layers, sigmoid scores, routed scaling, groups, a capacity factor, an
ungated or missing shared expert, MoE every n-th layer, q/k/v biases, a norm that is not zero-centred, full
attention without the output gate or q/k norm.
"""

from __future__ import annotations

from moecli.errors import UserError
from .features import shortest_pattern, unmet
from .base import softmax_moe_problems
from .qwen2_moe import name_map as shared_names, shared_expert_parts
from .qwen3_moe import EXPERT_WEIGHTS, MOE_PREFIX, qwen_moe_config, qwen_moe_parts  # noqa: F401 (EXPERT_WEIGHTS)

MODEL_TYPE = "qwen3_next"
ARCHITECTURE = "Qwen3NextForCausalLM"
MOE = True
WRITABLE = True
ATTENTION_BIAS = True
EXPRESSES = frozenset({"linear", "attention_gate", "zero_centered", "o_bias"})
_TYPES = {"linear_attention": "linear", "full_attention": "full"}
_LINEAR = (("in_qkvz.weight", "in_proj_qkvz.weight"), ("in_ba.weight", "in_proj_ba.weight"),
           ("conv_C1K", "conv1d.weight"), ("dt_bias_H", "dt_bias"), ("A_log_H", "A_log"),
           ("norm.weight", "norm.weight"), ("wo.weight", "out_proj.weight"))


def recipe_parts(cfg: dict, model: dict, count, source: str) -> tuple[dict, dict, dict]:
    n = model["n_layers"]
    interval = cfg.get("full_attention_interval") or 4
    types = cfg.get("layer_types") or ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(n)]
    if len(types) < n or any(t not in _TYPES for t in types[:n]):
        raise UserError(f"{source}: layer_types: expected {n} of linear_attention / full_attention, got {types!r}")
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    partial = rp.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 0.25))
    bias = bool(cfg.get("attention_bias", False))
    model = {**model, "layer_types": shortest_pattern([_TYPES[t] for t in types[:n]]), "attention_gate": True,
             "norm_zero_centered": True, "qk_norm": True, "rope_partial": float(partial), "qkv_bias": bias,
             "o_bias": bias, "linear_key_heads": count("linear_num_key_heads"),
             "linear_value_heads": count("linear_num_value_heads"), "linear_key_dim": count("linear_key_head_dim"),
             "linear_value_dim": count("linear_value_head_dim"), "linear_conv": count("linear_conv_kernel_dim")}
    return model, shared_expert_parts(cfg, qwen_moe_parts(cfg, model, count, source)), {"aux_loss_coef": cfg.get("router_aux_loss_coef", 0.0)}


def config(recipe) -> dict:
    r, m = recipe.model, recipe.moe
    return {**qwen_moe_config(recipe, MODEL_TYPE), "attention_bias": r.qkv_bias,
            "shared_expert_intermediate_size": m.shared_hidden, "partial_rotary_factor": r.rope_partial,
            "layer_types": [f"{r.layer_type(i)}_attention" for i in range(r.n_layers)],
            "linear_num_key_heads": r.linear_key_heads, "linear_num_value_heads": r.linear_value_heads,
            "linear_key_head_dim": r.linear_key_dim, "linear_value_head_dim": r.linear_value_dim,
            "linear_conv_kernel_dim": r.linear_conv}


def name_map(recipe, names: dict[str, str]) -> dict[str, str]:
    names = shared_names(recipe, names)
    for i in range(recipe.model.n_layers):
        if recipe.model.layer_type(i) != "linear":
            continue
        names = {k: v for k, v in names.items() if not k.startswith(f"layers.{i}.attention.")}
        for ours, theirs in _LINEAR:
            names[f"layers.{i}.attention.{ours}"] = f"model.layers.{i}.linear_attn.{theirs}"
    return names


def cannot_express(recipe) -> list[str]:
    r, m = recipe.model, recipe.moe
    return softmax_moe_problems(recipe) + unmet((
        (r.attention == "gqa", "MLA"),
        (not set(r.layer_types) - {"linear", "full"}, "layers other than linear and full"),
        (m.num_shared_experts == 1 and m.shared_gate, "other than one gated shared expert"),
        (r.norm_zero_centered, "plain RMSNorm weights (Qwen3-Next's are zero-centred)"),
        (r.attention_gate and r.qk_norm and not r.qk_norm_full,
         "full attention without its output gate and per-head q/k norm"),
        (r.qkv_bias == r.o_bias, "q/k/v biases without an o bias or the reverse")))
