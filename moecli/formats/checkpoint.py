"""Reading a checkpoint: the one path down. ``open_checkpoint`` finds the directory and reads its config.json and
recipe once (a moecli checkpoint, native.py; or a Hugging Face model, hf.py and its family); the ``Checkpoint``
then gives the weights as a whole model (``load_model``), one layer at a time (``reader``, layerwise.py), or as
tensors (``tensors``), and its tokenizer. Quantized weights (quant.py) are dequantized as they are read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from moecli.config import Recipe, recipe_from_dict
from moecli.data.tokenizers import Tokenizer, check_vocab, tokenizer_from_checkpoint
from moecli.errors import UserError
from moecli.fileio import read_json_object
from moecli.formats import hf
from moecli.formats.layerwise import LayerReader, open_stored
from moecli.model.lora import ADAPTER_FILE, LoRAConfig, add_lora, load_adapters, merge
from moecli.formats.native import (CONFIG_FILE, FORMAT, MODEL_FILE, VERSION, load_into, load_state_file,
                                   model_to_load)
from moecli.formats.st_stream import LazyTensors
from moecli.model.transformer import Transformer
from moecli.parallel.device import resolve_device

# --dtype of the commands that load a checkpoint to run it (eval, generate, inspect-routing): bfloat16 halves
# the memory of a big checkpoint and uses the CPU's bf16 units (and the threaded expert path,
# experts.use_threads); the router, and eval's loss, still take fp32.
LOAD_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


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


@dataclass
class Checkpoint:
    """A checkpoint directory, its config.json and recipe read once (``open_checkpoint``)."""
    directory: Path
    config: dict  # config.json as stored
    recipe: Recipe
    hf_config: dict | None = None  # a Hugging Face model's config as its family reads it (hf.family_config)

    @property
    def is_hf(self) -> bool:
        """A Hugging Face model (a pretrained model) rather than a moecli checkpoint."""
        return self.hf_config is not None

    @property
    def quantized(self) -> bool:
        """Stored quantized (FP8, MXFP4): its config.json has a quantization_config."""
        return bool(self.config.get("quantization_config"))

    def tensors(self) -> LazyTensors:
        """The stored tensors, read when asked for (layerwise.open_stored)."""
        return open_stored(self.directory, self.hf_config)

    @property
    def lora(self) -> LoRAConfig | None:
        """A LoRA run's adapters (config.json "lora": its rank, alpha, targets and base), or None."""
        d = None if self.is_hf else self.config.get("lora")
        return None if d is None else LoRAConfig.from_dict(d, str(self.directory / CONFIG_FILE))

    def load_model(self, dtype: torch.dtype = torch.float32) -> Transformer:
        """The whole model with its parameters in ``dtype`` (eval mode), once they are known to fit in memory; a
        LoRA run's: its base as stored (float32), the adapters merged in, then ``dtype``."""
        if self.lora is not None:
            return self._merged_lora(self.lora, dtype)
        model = model_to_load(self.recipe, self.directory, dtype)
        if self.hf_config is None:
            load_into(model, load_state_file(self.directory / MODEL_FILE, dtype), self.directory / MODEL_FILE,
                      assign=True)
        else:
            load_into(model, hf.state_dict(self.tensors(), self.directory, self.hf_config, model, dtype),
                      self.directory, assign=True)
        model.eval()
        return model

    def _merged_lora(self, cfg: LoRAConfig, dtype: torch.dtype) -> Transformer:
        base_dir = Path(cfg.base)
        if not (base_dir / CONFIG_FILE).is_file():
            raise UserError(f"{self.directory / CONFIG_FILE}: lora.base: {base_dir}: the base model these adapters "
                            "apply to is not there (moved? give it back, or export the run where it is)")
        model = open_checkpoint(base_dir).load_model(torch.float32)
        add_lora(model, cfg, 0)
        load_adapters(model, load_state_file(self.directory / ADAPTER_FILE), self.directory / ADAPTER_FILE)
        merge(model)
        return model.to(dtype).eval()

    def reader(self, dtype: torch.dtype = torch.float32, device="cpu") -> LayerReader:
        """The model one piece at a time (layer streaming, CPU only)."""
        if self.lora is not None:
            raise UserError(f"{self.directory}: a LoRA run is read whole (its adapters merged into its base), not one "
                            "layer at a time; export it (moe export) to stream the merged model")
        if str(device) != "cpu":
            raise UserError(f"--device {device}: layer streaming runs on the CPU")
        return LayerReader(self.directory, self.recipe, self.hf_config, dtype)

    def model_and_tokenizer(self, dtype: torch.dtype, device=torch.device("cpu"), streamed: bool = False):
        """(the model on ``device``, or with ``streamed`` a layer reader on the CPU; the tokenizer, checked against
        it): what eval, generate and inspect-routing run."""
        if streamed:
            reader = self.reader(dtype, device)
            return reader, self.tokenizer(reader)
        model = self.load_model(dtype)
        tok = self.tokenizer(model)
        return model.to(device), tok

    def tokenizer(self, model=None) -> Tokenizer:
        """The checkpoint's tokenizer (bytes where it names none), refused when larger than the model's
        vocabulary (``model``: the loaded model or reader; the recipe's otherwise)."""
        tok = tokenizer_from_checkpoint(self.directory, self.config)
        check_vocab(tok, model if model is not None else self, self.directory)
        return tok


def open_checkpoint(path: str | Path) -> Checkpoint:
    """A moecli checkpoint or a Hugging Face model directory (or a run directory holding checkpoint/), its config
    and recipe read and checked, no weight read yet."""
    directory = find_checkpoint_dir(path)
    cfg = read_config(directory)
    if cfg.get("format") == FORMAT:
        version = cfg.get("version", VERSION)
        if not isinstance(version, int) or isinstance(version, bool) or version > VERSION:
            raise UserError(f"{directory / CONFIG_FILE}: version: {version!r}; this moecli reads checkpoint format "
                            f"version {VERSION} (a newer moecli wrote it? upgrade moecli)")
        return Checkpoint(directory, cfg, recipe_from_dict(cfg.get("recipe"), str(directory / CONFIG_FILE) + " recipe"))
    if "model_type" in cfg:
        hc = hf.family_config(cfg, directory / CONFIG_FILE)
        return Checkpoint(directory, cfg, hf.recipe_from_hf(hc, str(directory / CONFIG_FILE)), hc)
    raise UserError(f"{directory / CONFIG_FILE}: not a moecli checkpoint (no \"format\": \"{FORMAT}\")")


def load_dtype(name: str, ckpt: Checkpoint | None = None) -> torch.dtype:
    """--dtype NAME as a torch dtype; anything else is bad input. ``auto``: float32, but bfloat16 for a checkpoint
    stored quantized (FP8, MXFP4), as transformers loads those."""
    if name == "auto":
        return torch.bfloat16 if ckpt is not None and ckpt.quantized else torch.float32
    if name not in LOAD_DTYPES:
        raise UserError(f"--dtype: one of {', '.join(LOAD_DTYPES)}, got {name!r}")
    return LOAD_DTYPES[name]


def open_to_run(path: str | Path, dtype: str, device: str = "cpu") -> tuple[Checkpoint, torch.dtype, torch.device]:
    """What eval, generate and inspect-routing start from: --dtype and --device checked, then the checkpoint
    opened and ``auto`` resolved for it."""
    if dtype != "auto":
        load_dtype(dtype)
    dev = resolve_device(device)
    ckpt = open_checkpoint(path)
    return ckpt, load_dtype(dtype, ckpt), dev


def load_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[Transformer, dict]:
    """(model, config.json) of a moecli checkpoint or a Hugging Face model directory, parameters in ``dtype``."""
    ckpt = open_checkpoint(path)
    return ckpt.load_model(dtype), ckpt.config


def load_with_tokenizer(path: str | Path, dtype: torch.dtype = torch.float32):
    """(model, config, directory, tokenizer) for a checkpoint, refusing a tokenizer larger than the model's vocab."""
    ckpt = open_checkpoint(path)
    model, tok = ckpt.model_and_tokenizer(dtype)
    return model, ckpt.config, ckpt.directory, tok
