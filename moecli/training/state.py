"""A run's directory and its state on disk: OUT/checkpoint (model, optimizer, train_state.json) swapped in
atomically, OUT/best, OUT/metrics.jsonl and the token cache in OUT/data; what a resume reads back, each field
checked before the run is touched.

    OUT/checkpoint/        model.safetensors, config.json, optimizer.safetensors,
                           train_state.json (+ tokenizer.json); swapped in atomically
    OUT/metrics.jsonl      one JSON object per step (and val_loss on eval steps)
    OUT/best/              with train.keep_best: the model at the lowest validation loss so far
    OUT/data/              the token cache (tokens.bin, tokens.json: with --data-weights, each source's span)

Under expert parallelism or FSDP every rank takes part in gathering the whole tensors; rank 0 writes them.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from moecli.errors import UserError
from moecli.fileio import atomic_dir, atomic_write_json, atomic_write_text, metrics_upto, read_json_object, \
    save_safetensors
from moecli.formats.native import (CONFIG_FILE, FORMAT, VERSION, check_values, dtype_name, load_state_file,
                                   model_state, save_checkpoint)
from moecli.model.lora import ADAPTER_FILE, LoRAConfig, adapter_state
from moecli.parallel.collectives import barrier
from moecli.parallel.data_parallel import full_tensor, is_dtensor, shard_like
from moecli.parallel.expert_parallel import expert_params, gather_experts
from moecli.parallel.launch import DistInfo


def _gathered(t: torch.Tensor, info: DistInfo, expert: bool) -> torch.Tensor | None:
    """A tensor whole: an expert-parallel block of experts gathered from every rank, or an FSDP shard
    all-gathered; None on ranks other than 0 for FSDP's, which only rank 0 writes (so no other rank holds a
    second whole copy of the model). Every rank calls it for the same tensors in the same order."""
    if expert and info.expert_parallel and info.world > 1:
        return gather_experts(t, info)
    if is_dtensor(t):
        full = full_tensor(t)
        return full if info.is_main else None
    return t


def _full_model_state(model, info: DistInfo) -> dict:
    """The model state with whole experts and whole FSDP-sharded tensors (every rank takes part)."""
    sd = {name: _gathered(v, info, ".moe.experts." in name) for name, v in model_state(model).items()}
    return {k: v for k, v in sd.items() if v is not None}


def _full_state(model, opt, info: DistInfo, with_model: bool = True) -> tuple[dict, dict]:
    """Model state (unless not ``with_model``: a LoRA run saves its adapters alone) and flat optimizer state, whole
    (gathered from every rank under EP and FSDP)."""
    sd = _full_model_state(model, info) if with_model else {}
    state = opt.state_dict()
    own = _expert_indices(model, opt) if info.expert_parallel and info.world > 1 else set()
    tensors = {}
    for idx, st in state["state"].items():
        for k, v in st.items():
            whole = _gathered(v, info, idx in own and k != "step")
            if whole is not None:
                tensors[f"{idx}.{k}"] = whole.contiguous()
    return sd, {"tensors": tensors, "param_groups": state["param_groups"]}


def _expert_indices(model, opt) -> set[int]:
    experts = expert_params(model)
    order = [p for g in opt.param_groups for p in g["params"]]
    return {i for i, p in enumerate(order) if id(p) in experts}


def lora_extra(lora: LoRAConfig | None, base_dtype: torch.dtype) -> dict:
    """What config.json says of a LoRA run's adapters (none without --lora)."""
    return {"lora": lora.to_dict(), "base_dtype": dtype_name(base_dtype)} if lora is not None else {}


def _save_model(tmp: Path, model, sd: dict, extra: dict, tokenizer) -> None:
    """config.json (with extra and the tokenizer's config), model.safetensors and tokenizer.json into tmp; with
    extra's "lora", the adapters alone in adapter.safetensors instead of the model (its base is named there)."""
    if "lora" in extra:
        save_safetensors(adapter_state(model), tmp / ADAPTER_FILE, metadata={"format": "pt"})
        config = {"format": FORMAT, "version": VERSION, "recipe": model.recipe.to_dict(), **extra,
                  "tokenizer": tokenizer.to_config()}
        atomic_write_json(tmp / CONFIG_FILE, config)
    else:
        save_checkpoint(model, tmp, {**extra, "tokenizer": tokenizer.to_config()}, state=sd)
    if tokenizer.kind == "hf":
        shutil.copyfile(tokenizer.path, tmp / "tokenizer.json")


def save_best(out: Path, model, tokenizer, info: DistInfo, position: dict) -> None:
    """OUT/best (train.keep_best): the model alone (a LoRA run's adapters alone: ``position``'s lora), with
    ``position`` (its step, tokens seen, data and validation loss) in config.json."""
    sd = {} if "lora" in position else _full_model_state(model, info)
    if info.is_main:
        with atomic_dir(out / "best", overwrite=True) as tmp:
            _save_model(tmp, model, sd, position, tokenizer)
    barrier()


def best_val_loss(out: Path) -> float:
    """The validation loss OUT/best was kept for (inf where there is none yet)."""
    try:
        return float(json.loads((out / "best" / CONFIG_FILE).read_text())["val_loss"])
    except (OSError, ValueError, KeyError, TypeError):
        return math.inf


def save_train_checkpoint(out: Path, model, opt, tokenizer, info: DistInfo, train_state: dict) -> Path:
    """OUT/checkpoint: model, optimizer and train_state.json: ``train_state`` (step, tokens seen, data,
    data_weights where given, and early_stop: the lowest validation loss so far and the passes since, so --resume
    counts on: ``signals.EarlyStop``) with the optimizer's param_groups."""
    target = out / "checkpoint"
    sd, ostate = _full_state(model, opt, info, with_model="lora" not in train_state or not train_state["lora"])
    if info.is_main:
        with atomic_dir(target, overwrite=True) as tmp:
            chosen = train_state.get("train_experts")  # --train-experts: taken up again by --resume
            _save_model(tmp, model, sd, {"step": train_state["step"], "tokens_seen": train_state["tokens_seen"],
                                         **({"train_experts": {str(i): v for i, v in chosen.items()}}
                                            if chosen else {}),
                                         **lora_extra(train_state.get("lora"), train_state.get("base_dtype"))},
                        tokenizer)
            save_safetensors(ostate["tensors"], tmp / "optimizer.safetensors")
            weights = train_state.get("data_weights")
            atomic_write_json(tmp / "train_state.json", {
                "step": train_state["step"], "tokens_seen": train_state["tokens_seen"],
                "param_groups": ostate["param_groups"], "data": train_state["data"],
                "early_stop": train_state["early_stop"], **({"data_weights": weights} if weights else {}),
            })
    barrier()
    return target


# what a run writes in its output directory (module docstring), and in OUT/data (data.prepare_tokens)
RUN_ENTRIES = ("checkpoint", "best", "data", "metrics.jsonl")
CACHE_ENTRIES = ("tokens.bin", "tokens.json", "val.bin", "val.json")


def foreign_entry(out: Path) -> Path | None:
    """The first entry of ``out`` that a run does not write (its own files, their temporary and .old names
    during an atomic write or swap, and the token cache's files in data/), or None."""
    def ours(entry: Path, names) -> bool:  # NAME, or .NAME.<...> (fileio's temporary and .old names)
        return entry.name in names or any(entry.name.startswith(f".{n}.") for n in names) \
            or any(entry.name.startswith(f"{n}.") and entry.name.endswith(".tmp") for n in names)

    if not out.is_dir():
        return None
    for entry in sorted(out.iterdir()):
        if not ours(entry, RUN_ENTRIES):
            return entry
        if entry.name == "data" and entry.is_dir():
            for inner in sorted(entry.iterdir()):
                if not ours(inner, CACHE_ENTRIES):
                    return inner
    return None


def find_resume_dir(out: Path) -> Path:
    for d in (out / "checkpoint", out / ".checkpoint.old"):  # .old survives a crash mid-swap
        if (d / CONFIG_FILE).is_file() and (d / "train_state.json").is_file():
            return d
    raise UserError(f"{out}: no checkpoint to resume from (expected {out / 'checkpoint'})")


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def read_train_state(directory: Path) -> dict:
    """A checkpoint's train_state.json, its fields checked before the run is touched (a damaged or hand-edited
    file is bad input naming the field, not a failure halfway through the resume)."""
    path = directory / "train_state.json"
    ts = read_json_object(path)

    def check(field: str, ok: bool, want: str) -> None:
        if not ok:
            raise UserError(f"{path}: {field}: must be {want}, got {ts.get(field)!r}")

    for name in ("step", "tokens_seen"):
        check(name, _whole(ts.get(name)), "a whole number >= 0")
    groups = ts.get("param_groups")
    check("param_groups", isinstance(groups, list) and all(isinstance(g, dict) for g in groups),
          "a list of objects (the optimizer's settings)")
    check("data", isinstance(ts.get("data", ""), str), "a string (the token cache's fingerprint)")
    w = ts.get("data_weights")
    check("data_weights", w is None or (isinstance(w, list) and len(w) > 0 and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0 for x in w)),
        "a list of positive numbers")
    es = ts.get("early_stop")
    low = es.get("lowest_val_loss") if isinstance(es, dict) else None
    check("early_stop", es is None or (isinstance(es, dict) and (low is None or (
        isinstance(low, (int, float)) and not isinstance(low, bool))) and all(
        _whole(es.get(k, 0)) for k in ("lowest_step", "passes"))),
        "an object with lowest_val_loss (a number or null), lowest_step and passes (whole numbers)")
    return ts


ADAMW_STATE = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def load_optimizer_state(model, opt, directory: Path, ts: dict, info: DistInfo) -> None:
    """The optimizer's state from OUT/checkpoint/optimizer.safetensors (whole experts; under expert
    parallelism each rank takes its own) and ``ts`` (read_train_state). Every tensor is checked against its
    parameter's shape first: AdamW's fused kernel would read past a smaller one."""
    path = directory / "optimizer.safetensors"
    flat = load_state_file(path)
    check_values(flat, path)
    params = [p for g in opt.param_groups for p in g["params"]]
    names = {id(p): n for n, p in model.named_parameters()}
    own = _expert_indices(model, opt) if info.expert_parallel and info.world > 1 else set()
    state: dict[int, dict] = {}
    for key, v in flat.items():
        idx, _, name = key.partition(".")
        if not idx.isdigit() or int(idx) >= len(params) or name not in ADAMW_STATE:
            raise UserError(f"{path}: {key}: not a tensor of this model's optimizer (AdamW, {len(params)} parameters)")
        p, i = params[int(idx)], int(idx)
        whole = (p.shape[0] * info.world, *p.shape[1:]) if i in own else tuple(p.shape)  # a DTensor's: whole
        want = () if name == "step" else whole
        if tuple(v.shape) != want:
            raise UserError(f"{path}: {key} has shape {tuple(v.shape)}; {names.get(id(p), 'its parameter')} "
                            f"needs {want}")
        if i in own and name != "step":
            El = v.shape[0] // info.world
            v = v[info.rank * El:(info.rank + 1) * El].clone()
        elif is_dtensor(p) and name != "step":  # FSDP: this rank's shard, as its parameter's
            v = shard_like(v, p)
        state.setdefault(i, {})[name] = v
    # how the step is computed (fused, foreach) is this layout's choice (_fused_kwargs), not the checkpoint's
    groups = [{**g, **{k: cur[k] for k in ("fused", "foreach") if k in cur}} if isinstance(g, dict) else g
              for g, cur in zip(ts["param_groups"], opt.param_groups)] + ts["param_groups"][len(opt.param_groups):]
    try:
        opt.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{directory / 'train_state.json'}: param_groups: do not fit this model's optimizer "
                        f"({e})") from None


def trim_metrics(path: Path, upto_step: int) -> None:
    if path.exists():
        atomic_write_text(path, "".join(line + "\n" for line, _ in metrics_upto(path, upto_step)))
