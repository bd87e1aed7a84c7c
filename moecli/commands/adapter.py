"""``moe export RUN -o DIR --adapter``: a LoRA run's adapters as a PEFT adapter directory (adapter_config.json and
adapter_model.safetensors) that ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), DIR)``
loads onto the base model in transformers (5.x: fused expert weights).

    linear layers   lora_A (r, in) and lora_B (out, r) as they are, under the module's Hugging Face name
    routed experts  through peft's ``target_parameters`` on the fused ``experts.gate_up_proj`` (E, 2I, H) and
                    ``experts.down_proj`` (E, H, I): peft's lora_A holds expert e's rows e*r .. e*r+r-1 (r*E, in),
                    its lora_B column k*E + e (out, r*E); moecli's A_e (in, r) and B_e (r, out) transposed into
                    those places. The gate_up product's first I rows are the gate's, as moecli's [w1 | w3].

Families whose fused experts transformers holds transposed or interleaved (GPT-OSS, Llama 4) get no expert adapter
here (refused: the merged export holds them); nor does a router adapter (transformers' routers are not all
nn.Linear).
"""

from __future__ import annotations

from pathlib import Path

import torch

from moecli.commands.export import pick_format
from moecli.errors import UserError
from moecli.fileio import atomic_dir, output_lock, atomic_write_json, save_safetensors
from moecli.formats import hf
from moecli.formats.checkpoint import open_checkpoint
from moecli.formats.families import FAMILIES
from moecli.formats.native import CONFIG_FILE, load_state_file
from moecli.model.lora import ADAPTER_FILE

# families whose transformers 5 experts are (E, 2I, H) gate-then-up and (E, H, I), as peft's target_parameters
# reads them untransposed
FUSED_EXPERTS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "glm4_moe",
                 "qwen3_next")
V5_MOE_PREFIX = {"mixtral": "mlp"}  # transformers 5 holds Mixtral's MoE under mlp (its files: block_sparse_moe)
# peft (0.18+, with transformers 5) reads targets with these leaf names, in these families, as transformers 4's
# per-expert projections and moves them onto the fused experts: an adapter of a dense FFN or a shared expert named
# so would not load where it belongs
PEFT_V4_EXPERT_NAMES = {"mixtral": {"w1", "w2", "w3", "gate"}}
PEFT_V4_EXPERT_NAMES.update({mt: {"gate_proj", "up_proj", "down_proj", "gate"} for mt in (
    "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "glm4_moe", "qwen3_next")})
PEFT_PREFIX = "base_model.model."


def export_adapter(checkpoint: str, output: Path, force: bool = False) -> dict:
    ckpt = open_checkpoint(checkpoint)
    cfg = ckpt.lora
    if cfg is None:
        raise UserError(f"{checkpoint}: --adapter: not a LoRA run (no adapters in {ckpt.directory / CONFIG_FILE}); "
                        "export without --adapter writes the model")
    if "router" in cfg.targets:
        raise UserError(f"{checkpoint}: --adapter: a router adapter is not written as PEFT (transformers' routers "
                        "are not all nn.Linear); export without --adapter writes the merged model")
    base = open_checkpoint(cfg.base)
    mt = base.hf_config["model_type"] if base.is_hf else pick_format(base.recipe)
    if "experts" in cfg.targets and mt not in FUSED_EXPERTS:
        raise UserError(f"{checkpoint}: --adapter: {mt}'s fused experts are held transposed by transformers; their "
                        "adapters are not written as PEFT here (export without --adapter writes the merged model)")
    output = Path(output)
    if output.resolve() in (ckpt.directory.resolve(), base.directory.resolve()):
        raise UserError(f"{output}: is the run or its base; choose another -o")
    sd = load_state_file(ckpt.directory / ADAPTER_FILE, torch.float32)
    tensors, modules, params = peft_tensors(sd, base.recipe, mt)
    clash = sorted(m for m in modules if m.rsplit(".", 1)[-1] in PEFT_V4_EXPERT_NAMES.get(mt, ()))
    if clash:
        raise UserError(f"{checkpoint}: --adapter: peft reads {clash[0]} (a dense FFN's or shared expert's) as "
                        f"{mt}'s transformers-4 expert weights and moves it onto the fused experts; train with "
                        "--lora-targets attention,experts for a PEFT adapter, or export without --adapter (merged)")
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.rank, "lora_alpha": cfg.alpha,
              "target_modules": sorted(modules), "target_parameters": sorted(params) or None,
              "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
              "use_dora": False, "init_lora_weights": True, "inference_mode": True, "rank_pattern": {},
              "alpha_pattern": {}, "modules_to_save": None,
              "base_model_name_or_path": str(base.directory) if base.is_hf else None}
    with output_lock(Path(output)), atomic_dir(output, overwrite=force) as tmp:
        save_safetensors(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        atomic_write_json(tmp / "adapter_config.json", config)
    return {"source": str(ckpt.directory), "output": str(output), "format": "peft", "family": mt,
            "base": str(base.directory), "base_is_hf": base.is_hf, "rank": cfg.rank, "alpha": cfg.alpha,
            "targets": cfg.targets, "tensors": len(tensors), "target_modules": len(modules),
            "target_parameters": sorted(params)}


def peft_tensors(sd: dict[str, torch.Tensor], recipe, mt: str) -> tuple[dict[str, torch.Tensor], set, set]:
    """(PEFT's adapter tensors, the modules they target, the expert parameters they target) from moecli's."""
    names = hf.plain_name_map(recipe, mt)
    prefix = V5_MOE_PREFIX.get(mt, FAMILIES[mt].MOE_PREFIX)
    out, modules, params = {}, set(), set()
    for key, t in sd.items():
        owner, _, leaf = key.partition(".lora.")
        if owner.endswith(".moe.experts"):
            i = int(owner.split(".")[1])
            E, r = t.shape[0], t.shape[-1] if leaf.endswith("A_EDr") or leaf.endswith("A_EFr") else t.shape[1]
            mod = f"model.layers.{i}.{prefix}.experts"
            # peft nests the two wrappers: gate_up's is the inner one (base_layer), down's the outer
            where = f"{mod}.base_layer" if leaf.startswith("gate_up") else mod
            if leaf.endswith("_A_EDr") or leaf.endswith("_A_EFr"):  # (E, in, r) -> (E*r, in), row e*r + k
                out[f"{PEFT_PREFIX}{where}.lora_A.weight"] = t.permute(0, 2, 1).reshape(E * r, -1).contiguous()
            else:  # (E, r, out) -> (out, r*E), column k*E + e
                out[f"{PEFT_PREFIX}{where}.lora_B.weight"] = t.permute(2, 1, 0).reshape(t.shape[2], -1).contiguous()
            params |= {f"{prefix}.experts.gate_up_proj", f"{prefix}.experts.down_proj"}
            continue
        theirs = names.get(f"{owner}.weight")
        if theirs is None:
            raise UserError(f"{key}: no Hugging Face {mt} module holds this adapter's layer")
        mod = theirs[: -len(".weight")].replace(f".{FAMILIES[mt].MOE_PREFIX}.", f".{prefix}.")
        out[f"{PEFT_PREFIX}{mod}.{leaf}.weight"] = t.contiguous()
        modules.add(mod)
    return out, modules, params
