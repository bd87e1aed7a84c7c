"""Hugging Face families, one module each: its config mapped both ways, its tensor names both ways, and what it
cannot express; base.py holds the defaults a family need not repeat (READ_AS, UPCYCLE_TO, ATTENTION_BIAS,
EXPERT_BIAS, name_map, empty_tensors). hf.py holds the Llama-style body every family shares (sizes, norms, GQA
attention names, dense FFN, router, the experts' loading) and asks the family module for the rest.

A module defines:
    MODEL_TYPE, ARCHITECTURE   config.json's model_type and architectures
    READ_AS                    other model_types in its layout, read as this one (kimi_k2, mistral)
    MOE, WRITABLE, UPCYCLE_TO  MoE or dense; written by export/upcycle; the MoE family a dense one upcycles to
    ATTENTION_BIAS             whether its config's attention_bias is read (else refused)
    EXPERT_BIAS                whether it holds aux-loss-free router biases
    MOE_PREFIX, EXPERT_WEIGHTS where a layer's MoE lives, and an expert's gate, up, down weight names (MoE)
    recipe_parts(cfg, model, count, source) -> (model, moe, balance) recipe sections
    config(recipe)             its config.json keys beside the shared ones
    name_map(recipe, names)    moecli -> Hugging Face names, from hf.py's shared ones
    cannot_express(recipe)     what of a recipe it cannot hold (export and upcycle refuse it, naming these)
    empty_tensors(recipe, i)   tensors it always holds that a model may have none of (written as zeros)
and may define:
    EXPRESSES                  the features of features.py it holds (sinks, sliding layers, expert biases, ...)
    CONTAINERS                 {model_type: key} of multimodal configs holding its config under key (llama4)
    container_prefixes(src)    {stored prefix: its own prefix} of such a checkpoint's language-model tensors
    read_experts(src, P, dtype), write_experts(experts, P, dtype)   its own expert layout (P: the experts' prefix)
"""

from . import base
from . import (deepseek_v2, deepseek_v3, glm4_moe, gpt_oss, llama, llama4, mixtral, olmoe, qwen2, qwen2_moe, qwen3,
               qwen3_moe, qwen3_next)

ALL = (llama, qwen2, qwen3, mixtral, qwen2_moe, qwen3_moe, olmoe, glm4_moe, deepseek_v3, deepseek_v2, gpt_oss, llama4,
       qwen3_next)
for _family in ALL:  # what a family does not define, the base holds
    for _name in base.DEFAULTS:
        if not hasattr(_family, _name):
            setattr(_family, _name, getattr(base, _name))

FAMILIES = {m.MODEL_TYPE: m for m in ALL}
CONTAINERS = {outer: (m.MODEL_TYPE, key) for m in FAMILIES.values() for outer, key in getattr(m, "CONTAINERS", {}).items()}
READ_AS = {other: m.MODEL_TYPE for m in FAMILIES.values() for other in m.READ_AS}  # kimi_k2 -> deepseek_v3
DENSE_WRITABLE = tuple(t for t, m in FAMILIES.items() if m.WRITABLE and not m.MOE)  # export's dense formats
MOE_WRITABLE = tuple(t for t, m in FAMILIES.items() if m.WRITABLE and m.MOE)  # export's (and upcycle's) MoE formats
