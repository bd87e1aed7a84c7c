"""moecli's own checkpoint files: a directory with ``config.json`` (the recipe) and ``model.safetensors``.

No pickle anywhere: weights are safetensors, everything else JSON. A training run writes its checkpoint to
``OUT/checkpoint/`` and swaps it in atomically. Reading any checkpoint (this format or a Hugging Face directory)
starts at formats/checkpoint.py; this module is the format itself: its names, writing it, and the checks every
loaded state passes (names, shapes, values).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from moecli.config import Recipe
from moecli.errors import UserError
from moecli.fileio import atomic_write_json, save_safetensors
from moecli.model.params import param_counts
from moecli.model.transformer import Transformer, meta_model
from moecli.parallel.device import check_fits

FORMAT = "moecli-checkpoint"
VERSION = 1  # config.json "version": the layout of the checkpoint's files and tensor names
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def model_state(model: Transformer) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.recipe.model.tie_embeddings:
        sd.pop("output.weight", None)  # stored once, as tok_embeddings.weight
    return sd


def save_checkpoint(model: Transformer, directory: Path, extra: dict | None = None,
                    state: dict[str, torch.Tensor] | None = None) -> None:
    """Write config.json + model.safetensors into an existing (usually temporary) directory.

    ``state`` replaces the model's own state dict (e.g. experts gathered from several ranks).
    """
    directory = Path(directory)
    save_safetensors(state if state is not None else model_state(model), directory / MODEL_FILE,
                     metadata={"format": "pt"})
    config = {"format": FORMAT, "version": VERSION, "recipe": model.recipe.to_dict()}
    config.update(extra or {})
    atomic_write_json(directory / CONFIG_FILE, config)


def load_state_file(path: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; with ``dtype``, read one at a time and each cast as it is read, so a
    file in another dtype is never held whole beside the result."""
    if not path.is_file():
        raise UserError(f"{path}: missing")
    try:
        if dtype is None:
            return load_file(str(path))
        with safe_open(str(path), "pt") as f:
            return {k: cast(f.get_tensor(k), dtype) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable safetensors file: {e}") from None


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A floating-point tensor in dtype; any other (refused later by check_values, naming it) as it is."""
    return t.to(dtype) if t.is_floating_point() else t


def model_to_load(recipe: Recipe, directory: Path, dtype: torch.dtype) -> Transformer:
    """The meta_model a loader fills (load_into with assign), once the weights in dtype are known to fit in the
    memory the machine has: before anything is read."""
    check_fits(param_counts(recipe)[0] * dtype.itemsize,
               f"{directory}: the model's {dtype_name(dtype)} weights",
               "--dtype bfloat16 (eval, generate, inspect-routing) takes half" if dtype.itemsize > 2 else
               "a machine with more memory is needed")
    return meta_model(recipe)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_shapes(model: Transformer, shapes: dict[str, tuple], source: Path | str) -> None:
    """The tensor names and shapes a checkpoint holds must be those of the model its config describes."""
    expected = {k: tuple(v.shape) for k, v in model_state(model).items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise UserError(f"{source}: tensors do not match the config ({what})")
    for k, shape in shapes.items():
        if tuple(shape) != expected[k]:
            raise UserError(f"{source}: {k} has shape {tuple(shape)}, config says {expected[k]}")


def check_values(sd: dict[str, torch.Tensor], source: Path | str) -> None:
    """Every tensor must hold floating-point numbers, all finite: a NaN or inf weight (a run saved after it
    diverged, a damaged file) would only show later as NaN losses or a sampler's failure."""
    for k, v in sd.items():
        if not v.is_floating_point():
            raise UserError(f"{source}: {k} has dtype {dtype_name(v.dtype)}; expected floating point")
        # a NaN or inf makes the sum non-finite (one fast pass); only then count (an overflowing sum counts 0)
        if not bool(torch.isfinite(v.sum())) and (bad := v.numel() - int(torch.isfinite(v).sum())):
            raise UserError(f"{source}: {k} holds {bad} NaN or inf value{'s' if bad > 1 else ''} (of {v.numel()})")


def load_into(model: Transformer, sd: dict[str, torch.Tensor], source: Path | str, assign: bool = False) -> None:
    """Load a checkpoint's tensors (checked: names, shapes, values) into ``model``. With ``assign``, ``model`` is
    a model_to_load (meta) and takes the tensors themselves, already in the dtype wanted: the weights are held
    once, not once in the model and again in ``sd``."""
    check_shapes(model, {k: tuple(v.shape) for k, v in sd.items()}, source)
    check_values(sd, source)
    if not assign:
        model.load_state_dict(sd, strict=False)
        return
    model.load_state_dict(sd, strict=False, assign=True)
    if model.recipe.model.tie_embeddings:  # assign replaced the shared Parameter on one side only
        model.output.weight = model.tok_embeddings.weight
