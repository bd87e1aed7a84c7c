"""Hugging Face interop without importing transformers: configs and tensor names, both ways.

This module holds the Llama-style body every family shares; each family's own mapping is a module in families/
(dense: llama and mistral, qwen2, qwen3; MoE: mixtral, qwen2_moe, qwen3_moe, olmoe (read only), glm4_moe,
deepseek_v3 and kimi_k2, deepseek_v2). Experts are written with per-expert tensor names, the layout transformers 4.x
writes and 5.x still loads; both that and 5.x's fused layout are read.

moecli stores experts as 3D tensors (w1_EDF, w3_EDF, w2_EFD); Hugging Face
stores one (out, in) matrix per expert, so expert e's gate is w1_EDF[e].T.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moecli.model import rope
from moecli.config import Recipe, recipe_from_dict
from moecli.formats.families import CONTAINERS, FAMILIES, READ_AS
from moecli.formats.families.features import beyond
from moecli.errors import UserError
from moecli.fileio import atomic_write_json
from moecli.formats import quant
from moecli.formats.st_stream import LazyTensors

# copied beside converted weights (upcycle, export) when the source has them
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "generation_config.json", "chat_template.jinja", "added_tokens.json")


def family_config(cfg: dict, p: Path) -> dict:
    """A Hugging Face config.json (``cfg``, read from ``p``) as its family reads it: a multimodal container's
    language model, a model_type read as another's layout (READ_AS), an unsupported model_type refused."""
    mt = cfg.get("model_type")
    if mt in CONTAINERS:  # a multimodal checkpoint (llama4): its language model's config, read as that family
        family, key = CONTAINERS[mt]
        inner = cfg.get(key)
        if not isinstance(inner, dict):
            raise UserError(f"{p}: {key}: missing (a Hugging Face {mt} config holds its language model's there)")
        cfg = {**inner, "model_type": family, "_container": mt}
        mt = family
    if mt in READ_AS:  # e.g. kimi_k2: DeepSeek-V3's layout under another name
        cfg = {**cfg, "model_type": READ_AS[mt]}
        mt = cfg["model_type"]
    if mt not in FAMILIES:
        moe = [t for t, f in FAMILIES.items() if f.MOE] + [t for t, f in READ_AS.items() if FAMILIES[f].MOE]
        dense = [t for t in FAMILIES if t not in moe] + [t for t, f in READ_AS.items() if not FAMILIES[f].MOE]
        raise UserError(f"{p}: model_type {mt!r} is not supported (dense: {', '.join(dense)}; MoE: {', '.join(moe)})")
    return cfg


def recipe_from_hf(cfg: dict, source: str = "config.json") -> Recipe:
    """The recipe of a Hugging Face config (family_config); a missing or malformed size is bad input naming
    the config's own key."""
    mt = cfg["model_type"]

    def count(key: str, *alternatives: str) -> int:  # a size the config must hold (or under an alternative name)
        v = next((cfg[k] for k in (key, *alternatives) if cfg.get(k) is not None), None)
        if v is None:
            raise UserError(f"{source}: {key}: missing (a Hugging Face {mt} config holds it)")
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise UserError(f"{source}: {key}: must be a whole number >= 1, got {v!r}")
        return v

    quant.method(cfg, source)  # a quantization moecli cannot read is refused here, before any weight
    if cfg.get("hidden_act", "silu") != "silu":
        raise UserError(f"{source}: hidden_act {cfg.get('hidden_act')!r} is not supported (SwiGLU/silu only)")
    family = FAMILIES[mt]
    if not family.ATTENTION_BIAS and cfg.get("attention_bias"):
        raise UserError(f"{source}: attention_bias is not supported")
    if cfg.get("mlp_bias"):
        raise UserError(f"{source}: mlp_bias is not supported")
    if cfg.get("clip_qkv") is not None:
        raise UserError(f"{source}: clip_qkv is not supported")
    n_heads, hidden = count("num_attention_heads"), count("hidden_size")
    hd = count("head_dim") if cfg.get("head_dim") else hidden // n_heads
    model = {
        "vocab_size": count("vocab_size"), "n_layers": count("num_hidden_layers"), "d_model": hidden,
        "n_heads": n_heads, "n_kv_heads": count("num_key_value_heads") if cfg.get("num_key_value_heads") else n_heads,
        "head_dim": hd if hd * n_heads != hidden else 0,
        "ffn_dim": count("intermediate_size"), "norm_eps": cfg.get("rms_norm_eps", 1e-6),
        **rope.from_hf(cfg, cfg.get("max_position_embeddings", 2048), source),
        "tie_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "init_std": cfg.get("initializer_range", 0.02),
    }
    model, moe, balance = family.recipe_parts(cfg, model, count, source)
    data = {"name": cfg.get("_name_or_path") or mt, "description": f"imported from Hugging Face {mt}",
            "model": model, "moe": moe, "balance": balance, "train": {"seq_len": min(128, model["context"])}}
    return recipe_from_dict(data, source)


# ---------------------------------------------------------------- names

def expert_names(mt: str, i: int, e: int) -> tuple[str, str, str]:
    """Layer i's expert e: its gate (w1), up (w3) and down (w2) weights' Hugging Face names."""
    f = FAMILIES[mt]
    return tuple(f"model.layers.{i}.{f.MOE_PREFIX}.experts.{e}.{w}.weight" for w in f.EXPERT_WEIGHTS)


def shard_file_name(k: int, n: int) -> str:
    """Hugging Face's name for weight file k of n: model.safetensors alone, else model-0000k-of-0000n."""
    return "model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"


def write_shard_index(directory: Path, weight_map: dict[str, str], total_bytes: int) -> None:
    """model.safetensors.index.json, which a sharded Hugging Face directory needs (none for one file)."""
    if len(set(weight_map.values())) > 1:
        atomic_write_json(Path(directory) / "model.safetensors.index.json",
                          {"metadata": {"total_size": total_bytes}, "weight_map": weight_map})


def plain_name_map(recipe: Recipe, mt: str) -> dict[str, str]:
    """moecli name -> HF name for every tensor that is not a routed expert weight."""
    m = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not recipe.model.tie_embeddings:
        m["output.weight"] = "lm_head.weight"
    for i in range(recipe.model.n_layers):
        L, H = f"layers.{i}", f"model.layers.{i}"
        m[f"{L}.attention_norm.weight"] = f"{H}.input_layernorm.weight"
        m[f"{L}.ffn_norm.weight"] = f"{H}.post_attention_layernorm.weight"
        for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
            m[f"{L}.attention.{ours}.weight"] = f"{H}.self_attn.{theirs}.weight"
            if recipe.model.o_bias if ours == "wo" else recipe.model.qkv_bias:
                m[f"{L}.attention.{ours}.bias"] = f"{H}.self_attn.{theirs}.bias"
        if recipe.model.attention_sinks:
            m[f"{L}.attention.sinks_H"] = f"{H}.self_attn.sinks"
        if recipe.model.qk_norm or recipe.model.qk_norm_full:
            m[f"{L}.attention.q_norm.weight"] = f"{H}.self_attn.q_norm.weight"
            m[f"{L}.attention.k_norm.weight"] = f"{H}.self_attn.k_norm.weight"
        if recipe.is_moe_layer(i):  # the router; shared experts are the family's (name_map)
            m[f"{L}.moe.router.gate.weight"] = f"{H}.{FAMILIES[mt].MOE_PREFIX}.gate.weight"
        else:
            for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                m[f"{L}.feed_forward.{ours}.weight"] = f"{H}.mlp.{theirs}.weight"
    return FAMILIES[mt].name_map(recipe, m)


def check_writable(recipe: Recipe, mt: str, instead: str) -> None:
    """Refuse MoE settings that the target Hugging Face architecture cannot express; ``instead``: what the
    message suggests (the command's own way out)."""
    family = FAMILIES[mt]
    problems = family.cannot_express(recipe) + beyond(recipe, getattr(family, "EXPRESSES", ()))
    if problems:
        raise UserError(f"--format {mt}: Hugging Face {mt} cannot express {', '.join(problems)}; {instead}")


def hf_config_for(recipe: Recipe, mt: str, base: dict | None) -> dict:
    """A config.json for ``mt`` from the recipe, keeping the source's token ids and other extras."""
    r = recipe.model
    cfg = {k: v for k, v in (base or {}).items()
           if k in ("bos_token_id", "eos_token_id", "pad_token_id", "sliding_window", "use_sliding_window",
                    "max_window_layers", "attention_dropout", "initializer_range", "torch_dtype", "dtype")}
    arch = FAMILIES[mt].ARCHITECTURE
    cfg.update({
        "architectures": [arch], "model_type": mt, "vocab_size": r.vocab_size, "hidden_size": r.d_model,
        "num_hidden_layers": r.n_layers, "num_attention_heads": r.n_heads, "num_key_value_heads": r.n_kv_heads,
        "head_dim": r.hd, "max_position_embeddings": r.context, "intermediate_size": r.ffn_dim,
        "rms_norm_eps": r.norm_eps, **rope.to_hf(r),
        "tie_word_embeddings": r.tie_embeddings, "hidden_act": "silu",
    })
    cfg.update(FAMILIES[mt].config(recipe))
    return cfg


# ---------------------------------------------------------------- loading into moecli


def expert_stack(src: LazyTensors, mt: str, i: int, E: int, dtype, contiguous: bool = True) -> dict[str, torch.Tensor]:
    """Per-layer expert tensors (per-expert names, or the fused 5.x names; or the family's own layout, its
    read_experts) -> w1_EDF, w3_EDF, w2_EFD (and biases). ``contiguous`` False: per-expert tensors are stacked
    as stored, (E, out, in), and the EDF / EFD tensors are transposed views of that (a plain copy instead of a
    transposing one: for a read that is used once, as layerwise.compare's)."""
    P = f"model.layers.{i}.{FAMILIES[mt].MOE_PREFIX}.experts"
    if hasattr(FAMILIES[mt], "read_experts"):
        return FAMILIES[mt].read_experts(src, P, dtype)
    if f"{P}.gate_up_proj" in src:  # fused layout: gate_up (E, 2F, D), down (E, D, F)
        gu = src.get(f"{P}.gate_up_proj").to(dtype)
        g, u = gu.chunk(2, dim=1)
        return {"w1_EDF": g.transpose(1, 2).contiguous(), "w3_EDF": u.transpose(1, 2).contiguous(),
                "w2_EFD": src.get(f"{P}.down_proj").to(dtype).transpose(1, 2).contiguous()}
    names = [expert_names(mt, i, e) for e in range(E)]
    if not contiguous:
        return {k: src.stack([n[j] for n in names], dtype).transpose(1, 2)
                for j, k in enumerate(("w1_EDF", "w3_EDF", "w2_EFD"))}
    return {k: torch.stack([src.get(n[j]).to(dtype).t() for n in names]) for j, k in enumerate(("w1_EDF", "w3_EDF",
                                                                                              "w2_EFD"))}


def open_tensors(directory: Path, cfg: dict) -> LazyTensors:
    """A Hugging Face directory's tensors under the names plain_name_map gives: a multimodal checkpoint's language
    model under its own prefixes (the rest read past), a family's other layouts under its names (family.alias)."""
    family = FAMILIES[cfg["model_type"]]
    src = LazyTensors.from_dir(Path(directory))
    if quant.method(cfg, str(Path(directory) / "config.json")) == "fp8":
        src.fp8_block = tuple(cfg["quantization_config"].get("weight_block_size") or (128, 128))
    if cfg.get("_container"):
        src.rename_prefixes(family.container_prefixes(src))
    if hasattr(family, "alias"):
        src.add_aliases(family.alias)
    return src


def state_dict(src: LazyTensors, directory: Path, cfg: dict, model, dtype) -> dict[str, torch.Tensor]:
    """A Hugging Face dense or MoE checkpoint's tensors (``src``: open_tensors) under moecli's names, in ``dtype``,
    for ``model`` (a meta model of recipe_from_hf's recipe): the routed experts stacked, zero router biases for
    a family without aux-free biases."""
    recipe = model.recipe
    mt = cfg["model_type"]
    sd = {}
    for ours, theirs in plain_name_map(recipe, mt).items():
        if theirs not in src:
            if ours == "output.weight" and not recipe.model.tie_embeddings:
                raise UserError(f"{directory}: lm_head.weight missing")
            raise UserError(f"{directory}: tensor {theirs} missing")
        sd[ours] = src.get(theirs).to(dtype)
    for i, _ in model.moe_layers:
        for k, v in expert_stack(src, mt, i, recipe.moe.num_experts, dtype).items():
            sd[f"layers.{i}.moe.experts.{k}"] = v
    for k, v in model.state_dict().items():
        if k.endswith("expert_bias") and k not in sd:  # a family without aux-free router biases
            sd[k] = torch.zeros(v.shape, dtype=dtype)
    return sd
