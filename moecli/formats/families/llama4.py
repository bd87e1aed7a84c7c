"""Llama 4 text (model_type llama4_text, transformers' Llama4ForCausalLM; and the language model inside
Llama4ForConditionalGeneration checkpoints, model_type llama4, whose text_config is read and vision tower read past).

Architecture, against the Llama body hf.py shares:
    attention  RoPE on pairs of dims (interleaved, llama3 scaling) except on NoPE layers (no_rope_layers 0);
               RoPE layers chunked (attention_chunk_size: a query sees its own chunk only) and L2-normalised q/k
               after RoPE (use_qk_norm); NoPE layers full, with temperature tuning (attn_temperature_tuning:
               queries times 1 + attn_scale log(1 + floor((position + 1) / floor_scale)))
    MoE        on layers interleave_moe_layer_step - 1, 2 x step - 1, ... (moe_layers), dense layers of
               intermediate_size_mlp between; a shared expert plus routed top-k whose sigmoid(logit) scales the
               expert's input (not its output)

Tensor names (moecli <- Hugging Face model.layers.i.feed_forward.):
    moe.router.gate                  router
    moe.shared.w1|w3|w2              shared_expert.gate_proj|up_proj|down_proj
    moe.experts.w1_EDF, w3_EDF       experts.gate_up_proj[:, :, :F], [:, :, F:]  (E, D, 2F)
    moe.experts.w2_EFD               experts.down_proj (E, F, D)
    feed_forward.w1|w3|w2 (dense)    gate_proj|up_proj|down_proj
A multimodal checkpoint's language model: language_model.model.* (its files) or model.language_model.*
(transformers 5's save), and language_model.lm_head / lm_head.

Cannot express: MLA, q/k RMSNorm, sliding layers, sinks, rotate-half RoPE, softmax scores, renormalised top-k,
output-weighted experts, no or several shared experts, MoE after dense-first layers, groups, routed scaling, a
capacity factor, partial rotary, chunked NoPE layers.
"""

from __future__ import annotations

import torch

from moecli.errors import UserError
from .features import shortest_pattern, unmet

MODEL_TYPE = "llama4_text"
ARCHITECTURE = "Llama4ForCausalLM"
CONTAINERS = {"llama4": "text_config"}
MOE = True
WRITABLE = True
ATTENTION_BIAS = True
MOE_PREFIX = "feed_forward"
EXPRESSES = frozenset({"o_bias", "chunked", "nope", "l2_norm", "temperature", "weight_input", "interleave"})


def recipe_parts(cfg: dict, model: dict, count, source: str) -> tuple[dict, dict, dict]:
    n = model["n_layers"]
    interval = cfg.get("no_rope_layer_interval") or 4
    rope_layers = cfg.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n)]
    chunk = cfg.get("attention_chunk_size") or 0
    kinds = cfg.get("layer_types") or ["chunked_attention" if r and chunk else "full_attention" for r in rope_layers]
    if len(rope_layers) < n or len(kinds) < n:
        raise UserError(f"{source}: no_rope_layers and layer_types: need an entry per layer ({n})")
    types = []
    for i in range(n):
        chunked = kinds[i] == "chunked_attention" and chunk
        if kinds[i] not in ("chunked_attention", "full_attention"):
            raise UserError(f"{source}: layer_types[{i}]: {kinds[i]!r} is not supported")
        if chunked and not rope_layers[i]:
            raise UserError(f"{source}: layer {i}: chunked attention on a NoPE layer is not supported")
        types.append("chunked" if chunked else "full" if rope_layers[i] else "nope")
    step = cfg.get("interleave_moe_layer_step") or 1
    moe_layers = cfg.get("moe_layers")
    if moe_layers is not None and list(moe_layers) != list(range(step - 1, n, step)):
        raise UserError(f"{source}: moe_layers: only every interleave_moe_layer_step-th layer "
                        f"({list(range(step - 1, n, step))}) is supported, got {moe_layers}")
    bias = bool(cfg.get("attention_bias", False))
    model = {**model, "ffn_dim": count("intermediate_size_mlp") if step > 1 else model["ffn_dim"],
             "rope_interleave": True, "qkv_bias": bias, "o_bias": bias,
             "layer_types": shortest_pattern(types), "attention_chunk": chunk,
             "qk_l2_norm": bool(cfg.get("use_qk_norm", True)),
             "temperature_floor": int(cfg.get("floor_scale", 8192)) if cfg.get("attn_temperature_tuning", True) else 0,
             "temperature_scale": float(cfg.get("attn_scale", 0.1))}
    moe = {"num_experts": count("num_local_experts"), "top_k": count("num_experts_per_tok"),
           "expert_ffn": count("intermediate_size"), "num_shared_experts": 1, "score_func": "sigmoid",
           "renormalize": False, "weight_input": True, "moe_every_n": step}
    return model, moe, {"aux_loss_coef": cfg.get("router_aux_loss_coef", 0.0)}


def config(recipe) -> dict:
    r, m = recipe.model, recipe.moe
    types = [r.layer_type(i) for i in range(r.n_layers)]
    return {"attention_bias": r.qkv_bias, "num_local_experts": m.num_experts, "num_experts_per_tok": m.top_k,
            "intermediate_size": m.expert_ffn, "intermediate_size_mlp": r.ffn_dim,
            "interleave_moe_layer_step": m.moe_every_n, "moe_layers": recipe.moe_layer_indices(),
            "no_rope_layers": [int(t != "nope") for t in types],
            "attention_chunk_size": r.attention_chunk or None,
            "layer_types": ["chunked_attention" if t == "chunked" else "full_attention" for t in types],
            "use_qk_norm": r.qk_l2_norm, "attn_temperature_tuning": bool(r.temperature_floor),
            "floor_scale": r.temperature_floor or 8192, "attn_scale": r.temperature_scale,
            "router_aux_loss_coef": recipe.balance.aux_loss_coef, "router_jitter_noise": 0.0}


def name_map(recipe, names: dict[str, str]) -> dict[str, str]:
    out = {k: v.replace(".mlp.", ".feed_forward.") for k, v in names.items()}
    for i in recipe.moe_layer_indices():
        L, P = f"layers.{i}.moe", f"model.layers.{i}.feed_forward"
        out[f"{L}.router.gate.weight"] = f"{P}.router.weight"
        for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            out[f"{L}.shared.{ours}.weight"] = f"{P}.shared_expert.{theirs}.weight"
    return out


def container_prefixes(src) -> dict[str, str]:
    if any(k.startswith("model.language_model.") for k in src.keys()):  # transformers 5's save
        return {"model.language_model.": "model.", "lm_head.": "lm_head."}
    return {"language_model.model.": "model.", "language_model.lm_head.": "lm_head."}


def read_experts(src, P: str, dtype) -> dict[str, torch.Tensor]:
    gate, up = src.get(f"{P}.gate_up_proj").to(dtype).chunk(2, dim=-1)
    return {"w1_EDF": gate.contiguous(), "w3_EDF": up.contiguous(), "w2_EFD": src.get(f"{P}.down_proj").to(dtype)}


def write_experts(ex, P: str, dtype) -> dict[str, torch.Tensor]:
    return {f"{P}.gate_up_proj": torch.cat([ex.w1_EDF.detach(), ex.w3_EDF.detach()], dim=-1).to(dtype).contiguous(),
            f"{P}.down_proj": ex.w2_EFD.detach().to(dtype).contiguous()}


def cannot_express(recipe) -> list[str]:
    r, m = recipe.model, recipe.moe
    return unmet((
        (r.attention == "gqa", "MLA"), (not (r.qk_norm or r.qk_norm_full), "q/k RMSNorm"),
        (r.rope_partial == 1.0, "partial rotary"), (r.rope_interleave, "rotate-half RoPE"),
        (r.qkv_bias == r.o_bias, "q/k/v biases without an o bias or the reverse"),
        (m.score_func == "sigmoid", "softmax scores"), (not m.renormalize, "renormalised top-k"),
        (m.weight_input, "output-weighted experts"),
        (m.num_shared_experts == 1 and m.shared_hidden == m.expert_ffn,
         "other than one shared expert of the routed experts' width"),
        (not m.first_k_dense, "dense-first layers"), (m.routed_scaling == 1.0, "routed scaling"),
        (not (m.n_groups > 1 and m.topk_groups < m.n_groups), "group-limited routing"),
        (m.capacity_factor == 0, "a capacity factor"), (not m.shared_gate, "a gated shared expert")))
