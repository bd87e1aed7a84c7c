"""Llama and Mistral (model_type llama, and mistral read as it): the dense body the other families build on.

Everything is hf.py's shared mapping: GQA without biases or q/k norm, a SwiGLU FFN per layer, RMSNorm, RoPE of any
variant (model/rope.py). Upcycled to Mixtral. Mistral's sliding_window is kept in configs moecli writes from it, not
applied (moecli's context is the model's max_position_embeddings). Cannot express: q/k norm, q/k/v biases, MoE layers.
"""

MODEL_TYPE = "llama"
ARCHITECTURE = "LlamaForCausalLM"
READ_AS = ("mistral",)
MOE = False  # a dense family
WRITABLE = True
UPCYCLE_TO = "mixtral"
MOE_PREFIX = "mlp"


def recipe_parts(cfg: dict, model: dict, count, source: str) -> tuple[dict, dict, dict]:
    return model, {}, {}


def config(recipe) -> dict:
    return {"attention_bias": False}


def cannot_express(recipe) -> list[str]:
    r = recipe.model
    return ["q/k norm"] * bool(r.qk_norm or r.qk_norm_full) + ["q/k/v biases"] * r.qkv_bias
