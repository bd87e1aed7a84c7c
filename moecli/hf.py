"""Hugging Face interop without importing transformers: configs and tensor names, both ways.

Dense families read: llama, mistral, qwen2, qwen3.
MoE families read and written: mixtral, qwen2_moe, qwen3_moe (per-expert tensor
names on disk, the layout transformers 4.x writes and 5.x still loads).

moecli stores experts as 3D tensors (w1_EDF, w3_EDF, w2_EFD); Hugging Face
stores one (out, in) matrix per expert, so expert e's gate is w1_EDF[e].T.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import rope
from .config import Recipe, recipe_from_dict
from .families import FAMILIES, READ_AS
from .errors import UserError
from .fileio import atomic_write_json, read_json_object
from .st_stream import LazyTensors

DENSE_TYPES = ("llama", "mistral", "qwen2", "qwen3")
MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")  # read and written
READ_ONLY_MOE_TYPES = ("olmoe",)
QKV_BIAS_TYPES = ("qwen2", "qwen2_moe")
# copied beside converted weights (upcycle, export) when the source has them
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "generation_config.json", "chat_template.jinja", "added_tokens.json")
QK_NORM_TYPES = ("qwen3", "qwen3_moe")


def read_hf_config(directory: Path) -> dict:
    p = Path(directory) / "config.json"
    cfg = read_json_object(p, "Hugging Face config")
    mt = cfg.get("model_type")
    if mt in READ_AS:  # e.g. kimi_k2: DeepSeek-V3's layout under another name
        cfg = {**cfg, "model_type": READ_AS[mt]}
        mt = cfg["model_type"]
    if mt not in DENSE_TYPES + MOE_TYPES + READ_ONLY_MOE_TYPES + tuple(FAMILIES):
        raise UserError(f"{p}: model_type {mt!r} is not supported (dense: {', '.join(DENSE_TYPES)}; "
                        f"MoE: {', '.join(MOE_TYPES + tuple(FAMILIES) + tuple(READ_AS) + READ_ONLY_MOE_TYPES)})")
    return cfg


def recipe_from_hf(cfg: dict, source: str = "config.json") -> Recipe:
    """The recipe of a Hugging Face config (read_hf_config); a missing or malformed size is bad input naming
    the config's own key."""
    mt = cfg["model_type"]

    def count(key: str, *alternatives: str) -> int:  # a size the config must hold (or under an alternative name)
        v = next((cfg[k] for k in (key, *alternatives) if cfg.get(k) is not None), None)
        if v is None:
            raise UserError(f"{source}: {key}: missing (a Hugging Face {mt} config holds it)")
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise UserError(f"{source}: {key}: must be a whole number >= 1, got {v!r}")
        return v

    if cfg.get("hidden_act", "silu") != "silu":
        raise UserError(f"{source}: hidden_act {cfg.get('hidden_act')!r} is not supported (SwiGLU/silu only)")
    if mt not in QKV_BIAS_TYPES + tuple(FAMILIES) and cfg.get("attention_bias"):
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
        "qkv_bias": mt in QKV_BIAS_TYPES and bool(cfg.get("qkv_bias", True)), "qk_norm": mt in QK_NORM_TYPES,
        "qk_norm_full": mt == "olmoe",
        "init_std": cfg.get("initializer_range", 0.02),
    }
    moe, balance = {}, {}
    if mt in FAMILIES:
        model, moe, balance = FAMILIES[mt].recipe_parts(cfg, model, count, source)
    elif mt == "mixtral":
        moe = {"num_experts": count("num_local_experts"), "top_k": count("num_experts_per_tok"),
               "expert_ffn": model["ffn_dim"], "renormalize": True}
        balance = {"aux_loss_coef": cfg.get("router_aux_loss_coef", 0.0)}
    elif mt == "olmoe":
        moe = {"num_experts": count("num_experts", "num_local_experts"), "top_k": count("num_experts_per_tok"),
               "expert_ffn": model["ffn_dim"], "renormalize": bool(cfg.get("norm_topk_prob", False))}
        balance = {"aux_loss_coef": cfg.get("router_aux_loss_coef", 0.0)}
    elif mt in ("qwen2_moe", "qwen3_moe"):
        moe = {"num_experts": count("num_experts", "num_local_experts"), "top_k": count("num_experts_per_tok"),
               "expert_ffn": count("moe_intermediate_size"), "renormalize": bool(cfg.get("norm_topk_prob", False))}
        step = cfg.get("decoder_sparse_step", 1) or 1
        dense_layers = sorted(cfg.get("mlp_only_layers") or [])
        if dense_layers and (step != 1 or dense_layers != list(range(len(dense_layers)))):
            raise UserError(f"{source}: mlp_only_layers {dense_layers} with decoder_sparse_step {step} is not a "
                            "layout moecli supports (first k layers dense, then every n-th)")
        moe.update(first_k_dense=len(dense_layers), moe_every_n=step)
        if mt == "qwen2_moe":
            shared = cfg.get("shared_expert_intermediate_size", 0)
            if shared:
                moe.update(num_shared_experts=1, shared_ffn=shared, shared_gate=True)
        balance = {"aux_loss_coef": cfg.get("router_aux_loss_coef", 0.0)}
    data = {"name": cfg.get("_name_or_path") or mt, "description": f"imported from Hugging Face {mt}",
            "model": model, "moe": moe, "balance": balance, "train": {"seq_len": min(128, model["context"])}}
    return recipe_from_dict(data, source)


# ---------------------------------------------------------------- names

def _moe_prefix(mt: str) -> str:
    return "block_sparse_moe" if mt == "mixtral" else "mlp"


def _expert_names(mt: str, i: int, e: int) -> tuple[str, str, str]:
    p = f"model.layers.{i}.{_moe_prefix(mt)}.experts.{e}"
    if mt == "mixtral":
        return f"{p}.w1.weight", f"{p}.w3.weight", f"{p}.w2.weight"
    return f"{p}.gate_proj.weight", f"{p}.up_proj.weight", f"{p}.down_proj.weight"


def shard_file_name(k: int, n: int) -> str:
    """Hugging Face's name for weight file k of n: model.safetensors alone, else model-0000k-of-0000n."""
    return "model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"


def write_shard_index(directory: Path, weight_map: dict[str, str], total_bytes: int) -> None:
    """model.safetensors.index.json, which a sharded Hugging Face directory needs (none for one file)."""
    if len(set(weight_map.values())) > 1:
        atomic_write_json(Path(directory) / "model.safetensors.index.json",
                          {"metadata": {"total_size": total_bytes}, "weight_map": weight_map})


def qwen2_empty_shared_expert(i: int, D: int) -> list[tuple[str, tuple[int, int]]]:
    """Qwen2-MoE always has a shared expert: a model without one gets it empty (zero width, zero gate)."""
    P = f"model.layers.{i}.mlp.shared_expert"
    return [(f"{P}.gate_proj.weight", (0, D)), (f"{P}.up_proj.weight", (0, D)), (f"{P}.down_proj.weight", (D, 0)),
            (f"{P}_gate.weight", (1, D))]


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
            if recipe.model.qkv_bias and ours != "wo":
                m[f"{L}.attention.{ours}.bias"] = f"{H}.self_attn.{theirs}.bias"
        if recipe.model.qk_norm or recipe.model.qk_norm_full:
            m[f"{L}.attention.q_norm.weight"] = f"{H}.self_attn.q_norm.weight"
            m[f"{L}.attention.k_norm.weight"] = f"{H}.self_attn.k_norm.weight"
        if recipe.is_moe_layer(i):
            P = f"{H}.{_moe_prefix(mt)}"
            m[f"{L}.moe.router.gate.weight"] = f"{P}.gate.weight"
            if recipe.moe.num_shared_experts:
                for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                    m[f"{L}.moe.shared.{ours}.weight"] = f"{P}.shared_expert.{theirs}.weight"
            if recipe.moe.shared_gate:
                m[f"{L}.moe.shared_gate.weight"] = f"{P}.shared_expert_gate.weight"
        else:
            for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                m[f"{L}.feed_forward.{ours}.weight"] = f"{H}.mlp.{theirs}.weight"
    return FAMILIES[mt].name_map(recipe, m) if mt in FAMILIES else m


def check_writable(recipe: Recipe, mt: str, instead: str) -> None:
    """Refuse MoE settings that the target Hugging Face architecture cannot express; ``instead``: what the
    message suggests (the command's own way out)."""
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
    if mt == "mixtral":
        if not m.renormalize:
            problems.append("un-renormalised top-k")
        if m.num_shared_experts:
            problems.append("shared experts")
        if m.first_k_dense or m.moe_every_n != 1:
            problems.append("dense layers")
        if recipe.model.qkv_bias or recipe.model.qk_norm:
            problems.append("q/k/v bias or q/k norm")
    if mt == "qwen3_moe" and (m.num_shared_experts or not recipe.model.qk_norm or recipe.model.qkv_bias):
        problems.append("shared experts" if m.num_shared_experts else "an attention layout other than Qwen3's")
    if mt == "qwen2_moe":
        if m.num_shared_experts and not m.shared_gate:
            problems.append("an ungated shared expert")
        if recipe.model.qk_norm or not recipe.model.qkv_bias:
            problems.append("an attention layout other than Qwen2's")
    if mt in FAMILIES:
        problems = FAMILIES[mt].cannot_express(recipe)
    if problems:
        raise UserError(f"--format {mt}: Hugging Face {mt} cannot express {', '.join(problems)}; {instead}")


def hf_config_for(recipe: Recipe, mt: str, base: dict | None) -> dict:
    """A config.json for ``mt`` from the recipe, keeping the source's token ids and other extras."""
    r, m = recipe.model, recipe.moe
    cfg = {k: v for k, v in (base or {}).items()
           if k in ("bos_token_id", "eos_token_id", "pad_token_id", "sliding_window", "use_sliding_window",
                    "max_window_layers", "attention_dropout", "initializer_range", "torch_dtype", "dtype")}
    arch = {**{f.MODEL_TYPE: f.ARCHITECTURE for f in FAMILIES.values()}, "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
            "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "mistral": "MistralForCausalLM"}[mt]
    cfg.update({
        "architectures": [arch], "model_type": mt, "vocab_size": r.vocab_size, "hidden_size": r.d_model,
        "num_hidden_layers": r.n_layers, "num_attention_heads": r.n_heads, "num_key_value_heads": r.n_kv_heads,
        "head_dim": r.hd, "max_position_embeddings": r.context, "intermediate_size": r.ffn_dim,
        "rms_norm_eps": r.norm_eps, **rope.to_hf(r),
        "tie_word_embeddings": r.tie_embeddings, "hidden_act": "silu",
    })
    if mt not in QKV_BIAS_TYPES:
        cfg["attention_bias"] = False
    if mt in FAMILIES:
        cfg.update(FAMILIES[mt].config(recipe))
    elif mt == "mixtral":
        cfg.update(num_local_experts=m.num_experts, num_experts_per_tok=m.top_k, intermediate_size=m.expert_ffn,
                   router_aux_loss_coef=recipe.balance.aux_loss_coef, router_jitter_noise=0.0)
    elif mt in ("qwen2_moe", "qwen3_moe"):
        dense = [i for i in range(r.n_layers) if not recipe.is_moe_layer(i)]
        cfg.update(num_experts=m.num_experts, num_local_experts=m.num_experts, num_experts_per_tok=m.top_k,
                   moe_intermediate_size=m.expert_ffn,
                   norm_topk_prob=m.renormalize, decoder_sparse_step=1, mlp_only_layers=dense,
                   router_aux_loss_coef=recipe.balance.aux_loss_coef, output_router_logits=False)
        if m.moe_every_n != 1:
            raise UserError(f"--format {mt}: moe_every_n > 1 is not written for {mt}; use first_k_dense")
        if mt == "qwen2_moe":
            cfg["shared_expert_intermediate_size"] = m.shared_hidden if m.num_shared_experts else 0
            cfg["qkv_bias"] = True
    return cfg


# ---------------------------------------------------------------- loading into moecli


def _expert_stack(src: LazyTensors, mt: str, i: int, E: int, dtype) -> dict[str, torch.Tensor]:
    """Per-layer expert tensors (per-expert names, or the fused 5.x names) -> w1_EDF, w3_EDF, w2_EFD."""
    P = f"model.layers.{i}.{_moe_prefix(mt)}.experts"
    if f"{P}.gate_up_proj" in src:  # fused layout: gate_up (E, 2F, D), down (E, D, F)
        gu = src.get(f"{P}.gate_up_proj").to(dtype)
        g, u = gu.chunk(2, dim=1)
        return {"w1_EDF": g.transpose(1, 2).contiguous(), "w3_EDF": u.transpose(1, 2).contiguous(),
                "w2_EFD": src.get(f"{P}.down_proj").to(dtype).transpose(1, 2).contiguous()}
    w1, w3, w2 = [], [], []
    for e in range(E):
        n1, n3, n2 = _expert_names(mt, i, e)
        w1.append(src.get(n1).to(dtype).t())
        w3.append(src.get(n3).to(dtype).t())
        w2.append(src.get(n2).to(dtype).t())
    return {"w1_EDF": torch.stack(w1), "w3_EDF": torch.stack(w3), "w2_EFD": torch.stack(w2)}


def load_hf_model(directory: Path, dtype=torch.float32, recipe: Recipe | None = None):
    """A Hugging Face dense or MoE checkpoint loaded into moecli's Transformer (eval mode); `recipe`:
    recipe_from_hf of its config, where the caller has it already."""
    from .checkpoint import load_into, model_to_load

    directory = Path(directory)
    cfg = read_hf_config(directory)
    mt = cfg["model_type"]
    recipe = recipe or recipe_from_hf(cfg, str(directory / "config.json"))
    src = LazyTensors.from_dir(directory)
    model = model_to_load(recipe, directory, dtype)
    sd = {}
    for ours, theirs in plain_name_map(recipe, mt).items():
        if theirs not in src:
            if ours == "output.weight" and not recipe.model.tie_embeddings:
                raise UserError(f"{directory}: lm_head.weight missing")
            raise UserError(f"{directory}: tensor {theirs} missing")
        sd[ours] = src.get(theirs).to(dtype)
    for i, _ in model.moe_layers:
        for k, v in _expert_stack(src, mt, i, recipe.moe.num_experts, dtype).items():
            sd[f"layers.{i}.moe.experts.{k}"] = v
    for k, v in model.state_dict().items():
        if k.endswith("expert_bias") and k not in sd:  # a family without aux-free router biases
            sd[k] = torch.zeros(v.shape, dtype=dtype)
    load_into(model, sd, directory, assign=True)
    model.eval()
    return model
