"""``moe export``: a moecli checkpoint as a Hugging Face directory that transformers loads.

MoE models become Mixtral, Qwen3-MoE or Qwen2-MoE; dense ones Llama, Qwen3 or Qwen2 — whichever
architecture expresses the recipe (``--format auto`` picks by attention layout). Settings that a
target cannot express (sigmoid scores, routed scaling, a capacity factor, aux-free router biases, ...)
are refused with the reason, never silently dropped. After writing, the directory is read back and
its logits compared with the source model's on a seeded probe.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from moecli.formats.checkpoint import load_checkpoint, open_checkpoint
from moecli.formats.native import model_state
from moecli.config import Recipe
from moecli.errors import UserError
from moecli.fileio import atomic_dir, output_lock, atomic_write_json, save_safetensors
from moecli.formats.families import DENSE_WRITABLE, FAMILIES, MOE_WRITABLE
from moecli.formats.families.features import beyond
from moecli.formats.st_stream import assign_shards
from moecli.formats.hf import TOKENIZER_FILES, check_writable, expert_names, hf_config_for, plain_name_map, \
    shard_file_name, \
    write_shard_index
from moecli.commands.verify import probe_logits

MOE_FORMATS = MOE_WRITABLE
DENSE_FORMATS = DENSE_WRITABLE
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_format(recipe: Recipe) -> str:
    """The Hugging Face family whose layout matches the recipe (sinks, sliding layers: GPT-OSS; NoPE or chunked
    layers, input-weighted experts: Llama 4; MLA: DeepSeek; qk norm: Qwen3, qkv bias: Qwen2); for an MoE model
    whose first guess cannot hold it, the first MoE family that can (else the guess, which export then refuses,
    naming what it cannot express)."""
    guess = _guess_format(recipe)
    if not recipe.moe_layer_indices():
        return guess
    for fmt in (guess, *MOE_FORMATS):
        family = FAMILIES[fmt]
        if not family.cannot_express(recipe) + beyond(recipe, getattr(family, "EXPRESSES", ())):
            return fmt
    return guess


def _guess_format(recipe: Recipe) -> str:
    r, moe = recipe.model, bool(recipe.moe_layer_indices())
    if moe and (r.attention_sinks or "sliding" in r.layer_types or recipe.moe.expert_act == "clamped_swiglu"):
        return "gpt_oss"
    if moe and (recipe.moe.weight_input or r.qk_l2_norm or {"chunked", "nope"} & set(r.layer_types)):
        return "llama4_text"
    if r.attention == "mla":  # DeepSeek: V3's sigmoid router, or V2's softmax
        return "deepseek_v3" if recipe.moe.score_func == "sigmoid" or not moe else "deepseek_v2"
    if moe and recipe.moe.score_func == "sigmoid":  # DeepSeek-V3-style routing on GQA: GLM-4.5 holds it
        return "glm4_moe"
    if r.qk_norm and not r.qkv_bias:
        return "qwen3_moe" if moe else "qwen3"
    if r.qkv_bias and not r.qk_norm:
        return "qwen2_moe" if moe else "qwen2"
    return "mixtral" if moe else "llama"


def check_format(recipe: Recipe, fmt: str, model) -> None:
    moe = bool(recipe.moe_layer_indices())
    if fmt in DENSE_FORMATS:
        if moe:
            raise UserError(f"--format {fmt}: a dense architecture; this model has MoE layers "
                            f"(use one of {', '.join(MOE_FORMATS)})")
        r = recipe.model
        layout = {"llama": (False, False), "qwen3": (True, False), "qwen2": (False, True)}[fmt]
        if (bool(r.qk_norm or r.qk_norm_full), bool(r.qkv_bias)) != layout or r.qk_norm_full:
            raise UserError(f"--format {fmt}: the model's attention (qk_norm={r.qk_norm or r.qk_norm_full}, "
                            f"qkv_bias={r.qkv_bias}) is not {fmt}'s; try --format {pick_format(recipe)}")
        check_writable(recipe, fmt, "keep the moecli checkpoint")
        return
    if not moe:
        raise UserError(f"--format {fmt}: an MoE architecture; this model is dense (use one of "
                        f"{', '.join(DENSE_FORMATS)})")
    check_writable(recipe, fmt, "no Hugging Face format moecli writes holds this model (keep the moecli checkpoint: "
                                "moe eval, generate and inspect-routing read it)")
    for i, layer in model.moe_layers:
        if not FAMILIES[fmt].EXPERT_BIAS and layer.router.expert_bias.abs().max() > 0:
            raise UserError(f"--format {fmt}: layer {i} routes with aux-loss-free expert biases, which Hugging Face "
                            f"{fmt} cannot express")


def hf_state(model, recipe: Recipe, fmt: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Hugging Face tensor names -> tensors ([out, in] per expert, as nn.Linear stores them)."""
    sd = model_state(model)
    out = {theirs: sd[ours].to(dtype).contiguous() for ours, theirs in plain_name_map(recipe, fmt).items()}
    if fmt in MOE_FORMATS:
        for i, layer in model.moe_layers:
            ex = layer.experts
            if hasattr(FAMILIES[fmt], "write_experts"):
                out |= FAMILIES[fmt].write_experts(ex, f"model.layers.{i}.{FAMILIES[fmt].MOE_PREFIX}.experts", dtype)
                continue
            for e in range(recipe.moe.num_experts):
                n1, n3, n2 = expert_names(fmt, i, e)
                out[n1] = ex.w1_EDF[e].detach().t().to(dtype).contiguous()
                out[n3] = ex.w3_EDF[e].detach().t().to(dtype).contiguous()
                out[n2] = ex.w2_EFD[e].detach().t().to(dtype).contiguous()
            out |= {name: torch.zeros(shape, dtype=dtype) for name, shape in FAMILIES[fmt].empty_tensors(recipe, i)}
    return out


def export(checkpoint: str, output: Path, fmt: str = "auto", dtype: str = "float32", force: bool = False,
           shard_size_mb: float = 2000.0) -> dict:
    if dtype not in DTYPES:
        raise UserError(f"--dtype: one of {', '.join(DTYPES)}, got {dtype!r}")
    if not shard_size_mb > 0:
        raise UserError(f"--shard-size-mb: must be > 0, got {shard_size_mb}")
    ckpt = open_checkpoint(checkpoint)
    model, cfg, directory = ckpt.load_model(), ckpt.config, ckpt.directory  # the tokenizer's files are copied
    recipe = model.recipe
    fmt = pick_format(recipe) if fmt == "auto" else fmt
    if fmt not in MOE_FORMATS + DENSE_FORMATS:
        raise UserError(f"--format: one of auto, {', '.join(MOE_FORMATS + DENSE_FORMATS)}, got {fmt!r}")
    check_format(recipe, fmt, model)
    output = Path(output)
    if output.resolve() == Path(directory).resolve():
        raise UserError(f"{output}: is the checkpoint being exported; choose another -o")
    hf_cfg = hf_config_for(recipe, fmt, cfg if ckpt.is_hf else None)  # HF source: its token ids
    hf_cfg["torch_dtype"] = hf_cfg["dtype"] = dtype
    tensors = hf_state(model, recipe, fmt, DTYPES[dtype])
    tok_files = [f for f in TOKENIZER_FILES if (Path(directory) / f).is_file()]
    names = list(tensors)
    sizes = [t.numel() * t.element_size() for t in tensors.values()]
    shards = assign_shards(names, sizes, int(shard_size_mb * 2**20))
    with output_lock(Path(output)), atomic_dir(output, overwrite=force) as tmp:
        weight_map = {}
        for k, shard in enumerate(shards):
            fname = shard_file_name(k, len(shards))
            save_safetensors({n: tensors[n] for n in shard}, tmp / fname, metadata={"format": "pt"})
            weight_map.update({n: fname for n in shard})
        write_shard_index(tmp, weight_map, sum(sizes))
        atomic_write_json(tmp / "config.json", hf_cfg)
        for f in tok_files:
            shutil.copyfile(Path(directory) / f, tmp / f)
    ref = probe_logits(model)
    diff = float((ref - probe_logits(load_checkpoint(output)[0])).abs().max())
    return {
        "source": str(directory), "output": str(output), "format": fmt, "dtype": dtype,
        "architecture": hf_cfg["architectures"][0], "tensors": len(tensors), "shards": len(shards),
        "bytes": sum(sizes),
        "copied": tok_files,  # tokenizer / generation files of the source (none: moecli's byte tokenizer)
        "max_abs_logit_diff": diff, "max_abs_logit": float(ref.abs().max()),
    }
