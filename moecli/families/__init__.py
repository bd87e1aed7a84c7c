"""Hugging Face families, one module each: its config mapped both ways, its tensor names both ways, and what it
cannot express. hf.py holds what the Llama-style families share and asks the family module for the rest.

A module defines MODEL_TYPE, ARCHITECTURE, READ_AS (other model_types in its layout), EXPERT_BIAS (whether it
holds aux-loss-free router biases), recipe_parts(cfg, model, count, source), config(recipe),
name_map(recipe, names), cannot_express(recipe) and empty_tensors(recipe, layer); see glm4_moe.py.
"""

from . import deepseek_v2, deepseek_v3, glm4_moe

FAMILIES = {m.MODEL_TYPE: m for m in (deepseek_v2, deepseek_v3, glm4_moe)}
READ_AS = {other: m.MODEL_TYPE for m in FAMILIES.values() for other in m.READ_AS}  # kimi_k2 -> deepseek_v3
