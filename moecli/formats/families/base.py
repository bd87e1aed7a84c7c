"""What every family holds unless it says otherwise: the defaults the family modules used to repeat. A family
module defines only its differences (see __init__.py for the whole list); FAMILIES fills in the rest from here."""

READ_AS = ()  # no other model_type read as this one
UPCYCLE_TO = None  # not a dense family upcycle converts
ATTENTION_BIAS = False  # config's attention_bias refused
EXPERT_BIAS = False  # no aux-loss-free router biases


def name_map(recipe, names: dict[str, str]) -> dict[str, str]:
    """hf.py's shared moecli -> Hugging Face names, as they are."""
    return names


def empty_tensors(recipe, i: int) -> list:
    """No tensors the family always holds that a model may have none of."""
    return []


DEFAULTS = ("READ_AS", "UPCYCLE_TO", "ATTENTION_BIAS", "EXPERT_BIAS", "name_map", "empty_tensors")


def softmax_moe_problems(recipe) -> list[str]:
    """What no softmax-routed family of these (Mixtral, Qwen-MoE) holds."""
    m = recipe.moe
    problems = []
    if recipe.model.qk_norm_full:
        problems.append("OLMoE-style q/k norm")
    if m.score_func != "softmax":
        problems.append("sigmoid scores")
    if m.routed_scaling != 1.0:
        problems.append(f"routed_scaling {m.routed_scaling}")
    if m.n_groups > 1 and m.topk_groups < m.n_groups:
        problems.append("group-limited routing")
    if m.capacity_factor > 0:
        problems.append("a capacity factor")
    return problems
