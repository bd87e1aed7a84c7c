"""Checkpoints: a directory with ``config.json`` (the recipe) and ``model.safetensors``.

No pickle anywhere: weights are safetensors, everything else JSON. A training
run writes its checkpoint to ``OUT/checkpoint/`` and swaps it in atomically;
the loaders accept either that directory or ``OUT`` itself.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from .config import Recipe, recipe_from_dict
from .device import check_fits
from .errors import UserError
from .fileio import atomic_write_json, read_json_object, save_safetensors
from .model import Transformer, meta_model, param_counts

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


# --dtype of the commands that load a checkpoint to run it (eval, generate, inspect-routing): bfloat16 halves
# the memory of a big checkpoint and uses the CPU's bf16 units (and the threaded expert path,
# experts.use_threads); the router, and eval's loss, still take fp32.
LOAD_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_dtype(name: str, checkpoint: str | Path | None = None) -> torch.dtype:
    """--dtype NAME as a torch dtype; anything else is bad input. ``auto``: float32, but bfloat16 for a checkpoint
    stored quantized (FP8, MXFP4: its config.json has a quantization_config), as transformers loads those."""
    if name == "auto":
        try:
            quantized = checkpoint is not None and bool(read_config(find_checkpoint_dir(checkpoint)).get(
                "quantization_config"))
        except UserError:
            quantized = False  # the command's own loading says what is wrong with the checkpoint
        return torch.bfloat16 if quantized else torch.float32
    if name not in LOAD_DTYPES:
        raise UserError(f"--dtype: one of {', '.join(LOAD_DTYPES)}, got {name!r}")
    return LOAD_DTYPES[name]


def find_checkpoint_dir(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such checkpoint directory")
    if p.is_file():
        raise UserError(f"{p}: expected a checkpoint directory (with {CONFIG_FILE} and {MODEL_FILE}), got a file"
                        + (f"; give its directory, {p.parent}" if is_checkpoint_file(p) else ""))
    if (p / CONFIG_FILE).is_file():
        return p
    if (p / "checkpoint" / CONFIG_FILE).is_file():
        return p / "checkpoint"
    raise UserError(f"{p}: not a checkpoint directory (no {CONFIG_FILE})")


def is_checkpoint_file(p: Path) -> bool:
    """Whether a file is one of a checkpoint's own (its config.json or a .safetensors file), given where the
    checkpoint's directory belongs."""
    return p.is_file() and (p.name == CONFIG_FILE or p.suffix == ".safetensors")


def read_config(directory: Path) -> dict:
    return read_json_object(directory / CONFIG_FILE)


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


def is_hf_config(cfg: dict) -> bool:
    """Whether a checkpoint's config.json is a Hugging Face model's (a pretrained model) rather than moecli's."""
    return cfg.get("format") != FORMAT


def read_recipe(path: str | Path) -> tuple[Recipe, dict, Path]:
    """(recipe, config, directory) of a moecli checkpoint or a Hugging Face model directory (see hf.py),
    without reading its weights."""
    directory = find_checkpoint_dir(path)
    cfg = read_config(directory)
    if cfg.get("format") == FORMAT:
        version = cfg.get("version", VERSION)
        if not isinstance(version, int) or isinstance(version, bool) or version > VERSION:
            raise UserError(f"{directory / CONFIG_FILE}: version: {version!r}; this moecli reads checkpoint format "
                            f"version {VERSION} (a newer moecli wrote it? upgrade moecli)")
        return recipe_from_dict(cfg.get("recipe"), str(directory / CONFIG_FILE) + " recipe"), cfg, directory
    if "model_type" in cfg:
        from .hf import read_hf_config, recipe_from_hf

        return recipe_from_hf(read_hf_config(directory), str(directory / CONFIG_FILE)), cfg, directory
    raise UserError(f"{directory / CONFIG_FILE}: not a moecli checkpoint (no \"format\": \"{FORMAT}\")")


def load_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[Transformer, dict]:
    """Load a moecli checkpoint, or a Hugging Face model directory (see hf.py), with its parameters in
    `dtype`. Returns (model, config)."""
    recipe, cfg, directory = read_recipe(path)
    if cfg.get("format") != FORMAT:
        from .hf import load_hf_model

        return load_hf_model(directory, dtype, recipe), cfg
    model = model_to_load(recipe, directory, dtype)
    load_into(model, load_state_file(directory / MODEL_FILE, dtype), directory / MODEL_FILE, assign=True)
    model.eval()
    return model, cfg


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


def load_with_tokenizer(path: str | Path, dtype: torch.dtype = torch.float32):
    """(model, config, directory, tokenizer) for a checkpoint, refusing a tokenizer larger than the model's vocab."""
    from .data import check_vocab, tokenizer_from_checkpoint

    model, cfg = load_checkpoint(path, dtype)
    directory = find_checkpoint_dir(path)
    tok = tokenizer_from_checkpoint(directory, cfg)
    check_vocab(tok, model, directory)
    return model, cfg, directory, tok


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
