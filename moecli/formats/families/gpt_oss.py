"""GPT-OSS (model_type gpt_oss, transformers' GptOssForCausalLM).

Architecture, against the Llama body hf.py shares:
    attention  biases on q, k, v and o; a learned sink logit per head in every softmax's denominator; layer_types
               alternating sliding_attention (the last sliding_window tokens) and full_attention; YaRN RoPE
    MoE        every layer: num_local_experts experts, a router with a bias, softmax over the top-k logits
               (= softmax then renormalised top-k); experts with biases and the clamped SwiGLU
               (up + 1) * gate * sigmoid(swiglu_alpha * gate), gate clamped above at swiglu_limit, up both sides

Tensor names (moecli <- Hugging Face model.layers.i.):
    attention.wq|wk|wv|wo (.bias), sinks_H      self_attn.q_proj|k_proj|v_proj|o_proj (.bias), self_attn.sinks
    moe.router.gate.weight|bias                 mlp.router.weight|bias
    moe.experts.w1_EDF, w3_EDF                  mlp.experts.gate_up_proj[:, :, 0::2], [:, :, 1::2]  (E, D, 2F)
    moe.experts.b1_EF, b3_EF                    mlp.experts.gate_up_proj_bias[:, 0::2], [:, 1::2]
    moe.experts.w2_EFD, b2_ED                   mlp.experts.down_proj (E, F, D), down_proj_bias

Both layouts are read: bf16/fp32, and the released checkpoints' MXFP4 experts (gate_up_proj_blocks / _scales,
(E, 2F, D) packed; quant.py), dequantized as they are read.
Cannot express: MLA, q/k norm, chunked or NoPE layers, sigmoid scores, un-renormalised top-k, shared experts,
dense layers, routed scaling, groups, a capacity factor, partial rotary; a model without sinks, attention or
expert biases, or the clamped SwiGLU.
"""

from __future__ import annotations

import torch

from moecli.errors import UserError
from moecli.formats.quant import mxfp4_dequant
from moecli.model import rope
from .base import softmax_moe_problems
from .features import shortest_pattern, unmet

MODEL_TYPE = "gpt_oss"
ARCHITECTURE = "GptOssForCausalLM"
MOE = True
WRITABLE = True
ATTENTION_BIAS = True
MOE_PREFIX = "mlp"
EXPRESSES = frozenset({"sinks", "o_bias", "sliding", "router_bias", "expert_bias", "clamped_swiglu"})
_LAYER_TYPES = {"sliding_attention": "sliding", "full_attention": "full"}
# transformers' GptOssConfig default when a config states no RoPE: YaRN x32 from 4096 positions
_DEFAULT_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                 "original_max_position_embeddings": 4096}


def recipe_parts(cfg: dict, model: dict, count, source: str) -> tuple[dict, dict, dict]:
    if not cfg.get("rope_parameters") and not cfg.get("rope_scaling"):
        model = {**model, **rope.from_hf({**cfg, "rope_parameters": {**_DEFAULT_ROPE,
                                                                     "rope_theta": cfg.get("rope_theta", 150000.0)}},
                                         model["context"], source)}
    n = model["n_layers"]
    types = cfg.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    bad = [t for t in types if t not in _LAYER_TYPES]
    if bad or len(types) < n:
        raise UserError(f"{source}: layer_types: expected {n} of sliding_attention / full_attention, got {types!r}")
    window = cfg.get("sliding_window") or 0
    types = [_LAYER_TYPES[t] if window or t == "full_attention" else "full" for t in types[:n]]
    bias = bool(cfg.get("attention_bias", True))
    model = {**model, "qkv_bias": bias, "o_bias": bias, "attention_sinks": True,
             "layer_types": shortest_pattern(types), "sliding_window": window}
    moe = {"num_experts": count("num_local_experts"), "top_k": count("num_experts_per_tok"),
           "expert_ffn": model["ffn_dim"], "renormalize": True, "router_bias": True, "expert_ffn_bias": True,
           "expert_act": "clamped_swiglu", "swiglu_alpha": float(cfg.get("swiglu_alpha", 1.702)),
           "swiglu_limit": float(cfg.get("swiglu_limit", 7.0))}
    return model, moe, {"aux_loss_coef": cfg.get("router_aux_loss_coef", 0.0)}


def config(recipe) -> dict:
    r, m = recipe.model, recipe.moe
    types = [r.layer_type(i) for i in range(r.n_layers)]
    return {"attention_bias": r.qkv_bias, "num_local_experts": m.num_experts, "num_experts_per_tok": m.top_k,
            "intermediate_size": m.expert_ffn, "swiglu_alpha": m.swiglu_alpha, "swiglu_limit": m.swiglu_limit,
            "sliding_window": r.sliding_window or None,
            "layer_types": [f"{t}_attention" for t in types], "router_aux_loss_coef": recipe.balance.aux_loss_coef}


def name_map(recipe, names: dict[str, str]) -> dict[str, str]:
    for i in recipe.moe_layer_indices():
        P = f"model.layers.{i}.mlp"
        names[f"layers.{i}.moe.router.gate.weight"] = f"{P}.router.weight"
        names[f"layers.{i}.moe.router.gate.bias"] = f"{P}.router.bias"
    return names


def _weight(src, name: str, dtype) -> torch.Tensor:
    """An expert weight as transformers' module holds it, (E, in, out): stored so, or as MXFP4 ``name_blocks`` /
    ``name_scales`` of (E, out, in) (the released checkpoints), dequantized and transposed."""
    if f"{name}_blocks" in src:
        try:
            return mxfp4_dequant(src.get(f"{name}_blocks"), src.get(f"{name}_scales"), dtype).transpose(1, 2)
        except ValueError as e:
            raise UserError(f"tensor {name}_blocks: {e}") from None
    return src.get(name).to(dtype)


def read_experts(src, P: str, dtype) -> dict[str, torch.Tensor]:
    gu, gub = _weight(src, f"{P}.gate_up_proj", dtype), src.get(f"{P}.gate_up_proj_bias").to(dtype)
    return {"w1_EDF": gu[..., 0::2].contiguous(), "w3_EDF": gu[..., 1::2].contiguous(),
            "b1_EF": gub[..., 0::2].contiguous(), "b3_EF": gub[..., 1::2].contiguous(),
            "w2_EFD": _weight(src, f"{P}.down_proj", dtype).contiguous(),
            "b2_ED": src.get(f"{P}.down_proj_bias").to(dtype)}


def write_experts(ex, P: str, dtype) -> dict[str, torch.Tensor]:
    def pairs(a, b):  # gate and up interleaved along the last dim
        return torch.stack([a.detach(), b.detach()], dim=-1).flatten(-2).to(dtype).contiguous()

    return {f"{P}.gate_up_proj": pairs(ex.w1_EDF, ex.w3_EDF), f"{P}.gate_up_proj_bias": pairs(ex.b1_EF, ex.b3_EF),
            f"{P}.down_proj": ex.w2_EFD.detach().to(dtype).contiguous(),
            f"{P}.down_proj_bias": ex.b2_ED.detach().to(dtype).contiguous()}


def cannot_express(recipe) -> list[str]:
    r, m = recipe.model, recipe.moe
    return softmax_moe_problems(recipe) + unmet((
        (r.attention == "gqa", "MLA"), (not (r.qk_norm or r.qk_norm_full), "q/k norm"),
        (r.rope_partial == 1.0, "partial rotary"),
        (m.renormalize, "un-renormalised top-k"), (not m.num_shared_experts, "shared experts"),
        (not (m.first_k_dense or m.moe_every_n != 1), "dense layers"),
        (r.attention_sinks, "attention without sinks"),
        (r.qkv_bias and r.o_bias, "attention without q/k/v/o biases"),
        (m.router_bias, "a router without a bias"), (m.expert_ffn_bias, "experts without biases"),
        (m.expert_act == "clamped_swiglu", "plain SwiGLU experts")))
