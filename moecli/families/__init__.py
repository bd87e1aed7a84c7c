"""Hugging Face families, one module each: its config mapped both ways, its tensor names both ways, and what it
cannot express. hf.py holds what the Llama-style families share and asks the family module for the rest.

A module defines MODEL_TYPE, ARCHITECTURE, recipe_parts(cfg, model, count, source), config(recipe),
name_map(recipe, names), cannot_express(recipe) and empty_tensors(recipe, layer); see glm4_moe.py.
"""

from . import glm4_moe

FAMILIES = {m.MODEL_TYPE: m for m in (glm4_moe,)}
