"""``moe build``: a recipe -> an initialised checkpoint and a parameter report."""

from __future__ import annotations

from pathlib import Path

from moecli.formats.native import save_checkpoint
from moecli.config import prepare_recipe
from moecli.parallel.device import check_fits
from moecli.fileio import atomic_dir, output_lock
from moecli.model.transformer import build_model
from moecli.model.params import param_counts, parameter_report, recipe_parameter_report


def build(recipe_arg: str, output: Path | None, overrides: dict | None = None, force: bool = False) -> dict:
    """The recipe's parameter report; with ``output``, also its initialised checkpoint (float32 weights).
    Without one nothing is built (one block of each kind on the meta device), so a recipe of any size is measured."""
    recipe = prepare_recipe(recipe_arg, overrides)
    if output is None:
        report = recipe_parameter_report(recipe)
    else:
        check_fits(4 * param_counts(recipe)[0], f"{recipe_arg}: the model's float32 weights",
                   "without -o, moe build reports the parameters without allocating them")
        model = build_model(recipe)
        report = parameter_report(model)
        with output_lock(Path(output)), atomic_dir(Path(output), overwrite=force) as tmp:
            save_checkpoint(model, tmp, {"params": {k: v for k, v in report.items() if k != "layers"}})
    return {
        "recipe": recipe.name,
        "description": recipe.description,
        "output": str(output) if output is not None else None,
        "moe_layers": recipe.moe_layer_indices(),
        "params": report,
        "config": recipe.to_dict(),
    }
