"""``moe info``: what a checkpoint or recipe holds, or what this installation offers."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from . import __version__
from .config import list_recipes, load_recipe
from .errors import UserError
from .experts import threads_from_env
from .model import build_model
from .params import parameter_report


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
    if p.is_dir():
        from .checkpoint import load_checkpoint

        model, cfg = load_checkpoint(p)
        kind = "checkpoint"
        extra = {k: cfg[k] for k in ("step", "tokens_seen", "source") if k in cfg}
    else:
        try:
            recipe = load_recipe(target)
        except UserError:
            if not p.exists():
                raise UserError(f"{target}: no such checkpoint directory or recipe") from None
            raise
        model, kind, extra = build_model(recipe), "recipe", {}
    r = model.recipe
    return {
        "kind": kind, "target": target, "recipe": r.name, "description": r.description,
        "moe_layers": r.moe_layers(), "params": parameter_report(model), "config": r.to_dict(), **extra,
    }
