"""Architecture features that only some families hold (GPT-OSS's, Llama 4's): a family lists the ones it
expresses in EXPRESSES, and export and upcycle refuse a model using any other, naming it (hf.check_writable)."""

from __future__ import annotations

FEATURES = {  # name -> (does the recipe use it, what the refusal calls it)
    "sinks": (lambda r: r.model.attention_sinks, "attention sinks"),
    "interleave": (lambda r: r.model.attention == "gqa" and r.model.rope_interleave, "RoPE on interleaved pairs"),
    "o_bias": (lambda r: r.model.o_bias, "an output-projection bias"),
    "sliding": (lambda r: "sliding" in r.model.layer_types, "sliding-window layers"),
    "chunked": (lambda r: "chunked" in r.model.layer_types, "chunked attention layers"),
    "nope": (lambda r: "nope" in r.model.layer_types, "NoPE layers"),
    "l2_norm": (lambda r: r.model.qk_l2_norm, "L2 q/k norm"),
    "temperature": (lambda r: r.model.temperature_floor > 0 and "nope" in r.model.layer_types,
                    "attention temperature tuning"),
    "linear": (lambda r: "linear" in r.model.layer_types, "Gated DeltaNet (linear) layers"),
    "attention_gate": (lambda r: r.model.attention_gate, "gated attention output"),
    "zero_centered": (lambda r: r.model.norm_zero_centered, "zero-centred RMSNorm weights"),
    "router_bias": (lambda r: r.moe.num_experts > 0 and r.moe.router_bias, "a router bias"),
    "expert_bias": (lambda r: r.moe.num_experts > 0 and r.moe.expert_ffn_bias, "expert biases"),
    "clamped_swiglu": (lambda r: r.moe.num_experts > 0 and r.moe.expert_act == "clamped_swiglu",
                       "GPT-OSS's clamped SwiGLU"),
    "weight_input": (lambda r: r.moe.num_experts > 0 and r.moe.weight_input, "input-weighted experts (Llama 4)"),
}


def beyond(recipe, expresses: frozenset | set | tuple = ()) -> list[str]:
    """The features the recipe uses that a family expressing ``expresses`` cannot hold."""
    return [what for name, (used, what) in FEATURES.items() if name not in expresses and used(recipe)]


def unmet(conditions) -> list[str]:
    """What a family's cannot_express lists from (holds, what the refusal calls it otherwise) pairs."""
    return [what for ok, what in conditions if not ok]


def shortest_pattern(items: list) -> list:
    """The shortest prefix that repeated gives ``items`` (a recipe's layer_types is a repeating pattern)."""
    for p in range(1, len(items) + 1):
        if all(items[i] == items[i % p] for i in range(len(items))):
            return items[:p]
    return items
