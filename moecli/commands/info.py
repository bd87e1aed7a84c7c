"""``moe info``: what a checkpoint or recipe holds, or what this installation offers."""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path

import torch

from moecli import __version__
from moecli.formats.checkpoint import Checkpoint, find_checkpoint_dir, is_checkpoint_file, open_checkpoint
from moecli.formats.layerwise import stream_plan
from moecli.formats.native import MODEL_FILE, check_shapes, dtype_name
from moecli.config import list_recipes, load_recipe
from moecli.errors import UserError
from moecli.moe.experts import threads_from_env
from moecli.fileio import metrics_upto
from moecli.model.transformer import Transformer, meta_model
from moecli.model.params import param_counts, parameter_report, recipe_parameter_report
from moecli.parallel import device
from moecli.formats.st_stream import LazyTensors
from moecli.model.lora import ADAPTER_FILE


def info(target: str | None) -> dict:
    if target is None:
        return {
            "moecli": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "expert_threads": {None: "auto", True: "on", False: "off"}[threads_from_env()],
            "cuda": torch.cuda.is_available(),
            "recipes": {name: load_recipe(name).description for name in list_recipes()},
        }
    p = Path(target)
    if is_checkpoint_file(p):  # not a recipe
        find_checkpoint_dir(p)  # refuses it, naming the directory to give
    if p.is_dir():
        kind = "checkpoint"
        ckpt = open_checkpoint(p)
        recipe, cfg, directory = ckpt.recipe, ckpt.config, ckpt.directory
        model = meta_model(recipe)  # shapes only: a checkpoint of any size is described without its weights
        extra = {k: cfg[k] for k in ("step", "tokens_seen", "source", "lora", "train_experts") if k in cfg}
        has_weights = not ckpt.is_hf or any(directory.glob("*.safetensors")) or \
            (directory / "model.safetensors.index.json").is_file()
        # a Hugging Face config alone (no weights downloaded) is described too: layout, parameters, memory
        extra["weights"] = weights_summary(model, ckpt) if has_weights else None
        extra["memory"] = memory_plan(recipe, cfg)
        extra.update(last_metrics(directory, cfg.get("step")))
        if mix := data_mix(directory):
            extra["data_mix"] = mix
        if "val_loss" in cfg:  # a run's best model (train.keep_best) records the loss it was kept for
            extra["val_loss"] = {"step": cfg.get("step"), "value": cfg["val_loss"]}
    else:
        try:
            recipe = load_recipe(target)
        except UserError:
            if not p.exists():
                raise UserError(f"{target}: no such checkpoint directory or recipe") from None
            raise
        model, kind, extra = None, "recipe", {}
    report = parameter_report(model) if model is not None else recipe_parameter_report(recipe)
    return {
        "kind": kind, "target": target, "recipe": recipe.name, "description": recipe.description,
        "moe_layers": recipe.moe_layer_indices(), "params": report, "config": recipe.to_dict(), **extra,
    }


def memory_plan(recipe, cfg: dict) -> dict:
    """What running the model needs: its weights in bfloat16 and float32 against the memory available now, and
    what layer streaming (eval, inspect-routing) would need instead, at windows of 2048 tokens in bfloat16."""
    total = param_counts(recipe)[0]
    avail = device.available_memory()
    q = (cfg.get("quantization_config") or {}).get("quant_method") if isinstance(cfg.get("quantization_config"),
                                                                                dict) else None
    plan = stream_plan(recipe, torch.bfloat16, 2048)
    return {"bfloat16_bytes": 2 * total, "float32_bytes": 4 * total, "available_bytes": avail,
            "fits_bfloat16": None if avail is None else 2 * total <= avail,
            "quantized": q, "stream_bfloat16": plan,
            "streams_by_itself": None if avail is None else 2 * total > avail}


def weights_summary(model: Transformer, ckpt: Checkpoint) -> dict:
    """Files, bytes, tensors and dtypes of a checkpoint's weights, read from the safetensors headers only.
    A moecli checkpoint's tensor names and shapes are checked against its config, as loading it would."""
    moecli, directory = not ckpt.is_hf, ckpt.directory
    if ckpt.lora is not None:  # a LoRA run holds its adapters alone
        src = LazyTensors([directory / ADAPTER_FILE])
        metas = {k: src.meta(k) for k in src.keys()}
        return {"files": 1, "bytes": src.total_bytes(), "tensors": len(metas), "adapters": True,
                "dtypes": {dtype_name(d): sum(math.prod(s) for dd, s in metas.values() if dd == d)
                           for d in {dd for dd, _ in metas.values()}}}
    if moecli and not (directory / MODEL_FILE).is_file():
        raise UserError(f"{directory / MODEL_FILE}: missing")
    src = LazyTensors([directory / MODEL_FILE]) if moecli else LazyTensors.from_dir(directory)
    metas = {k: src.meta(k) for k in src.keys()}
    if moecli:
        check_shapes(model, {k: shape for k, (_, shape) in metas.items()}, directory / MODEL_FILE)
    dtypes: dict[str, int] = {}
    for dtype, shape in metas.values():
        name = dtype_name(dtype)
        dtypes[name] = dtypes.get(name, 0) + math.prod(shape)
    return {"files": len(src.handles), "bytes": src.total_bytes(), "tensors": len(metas), "dtypes": dtypes}


def data_mix(directory: Path) -> list[dict] | None:
    """For a run's checkpoint that mixed sources (--data-weights): each source (from the run's token cache)
    and its sampling weight (from train_state.json); else None."""
    try:
        weights = json.loads((directory / "train_state.json").read_text()).get("data_weights")
        parts = json.loads((directory.parent / "data" / "tokens.json").read_text()).get("parts")
    except (OSError, ValueError, AttributeError):
        return None
    if not weights or not parts or len(parts) != len(weights):
        return None
    return [{"source": src, "weight": w, "tokens": end - start} for (src, start, end), w in zip(parts, weights)]


def last_metrics(directory: Path, step: int | None) -> dict:
    """For a checkpoint in a training run (RUN/checkpoint beside RUN/metrics.jsonl): the last training loss,
    validation loss (each source's too, with --data-weights) and routing verdict (flagged layers, each
    expert's share) logged up to the checkpoint's step (later lines belong to steps it does not hold), and
    an early stop (train.patience) if one was."""
    path = directory.parent / "metrics.jsonl"
    if step is None or directory.name != "checkpoint" or not path.is_file():
        return {}
    found: dict = {}
    for _, row in metrics_upto(path, step):
        for key in ("loss", "val_loss", "val_loss_by_source", "routing", "early_stop"):
            if key in row:
                found[key] = {"step": row["step"], "value": row[key]}
    if found.get("early_stop", {}).get("step") != step:  # a stop that --resume went on from
        found.pop("early_stop", None)
    return found
