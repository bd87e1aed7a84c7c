"""A run's arguments and what is settled before any work: where the recipe and weights come from (a recipe, a
checkpoint to fine-tune, the run to resume), the output directory, the processes and device, the memory check, and
the run's token data."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from moecli.config import Recipe, apply_overrides, prepare_recipe
from moecli.data.tokenizers import Tokenizer, load_tokenizer
from moecli.data.corpus import JSONL_FIELD
from moecli.data.tokens import TokenData, prepare_tokens, read_tokens
from moecli.errors import UserError
from moecli.fileio import check_output
from moecli.formats.native import CONFIG_FILE, model_state
from moecli.formats.checkpoint import open_checkpoint
from moecli.parallel.device import resolve_device
from moecli.parallel.launch import launched_world, local_world
from moecli.model.lora import LORA_LR, LoRAConfig, check_rank, lora_parameters, parse_targets
from moecli.training import esft
from moecli.training.memory import Layout, check_training_fits
from moecli.training.state import find_resume_dir, foreign_entry, read_train_state


@dataclass
class TrainArgs:
    recipe: str | Recipe | None  # a name or path ("-": stdin); a Recipe in --nproc's ranks
    data: list[str] = field(default_factory=list)
    output: Path | None = None
    overrides: dict = field(default_factory=dict)
    resume: bool = False
    force: bool = False
    tokenizer: str | None = None
    quiet: bool = False
    nproc: int = 1  # > 1: spawn this many data-parallel processes
    expert_parallel: bool = False  # with nproc > 1: shard each layer's experts over the processes
    data_fingerprint: str | None = None  # set by the launcher: ranks reuse its token cache
    init: str | None = None  # start from this checkpoint's weights, recipe and tokenizer (e.g. an upcycled model)
    val_data: list[str] = field(default_factory=list)  # validation texts (--val-data); none: DATA's tail
    jsonl_field: str = JSONL_FIELD  # the text field of .jsonl sources (--jsonl-field)
    epochs: float | None = None  # --epochs: sets train.max_steps from the training tokens, once they are known
    # --data-weights: one sampling weight per DATA argument, each then a source with its own validation tail
    # (None: DATA is one stream; a resumed run keeps the weights in train_state.json unless given again)
    data_weights: list[float] | None = None
    device: str = "cpu"  # --device: where the model trains (cpu, cuda, cuda:N, auto); one process only off the CPU
    fsdp: bool = False  # --fsdp: shard parameters, gradients and AdamW state over the processes (FSDP2)
    train_experts: str | None = None  # --train-experts SPEC (training/esft.py): only those experts train
    lora: int | None = None  # --lora R: train low-rank adapters of rank R, the rest frozen (model/lora.py)
    lora_alpha: float | None = None  # --lora-alpha (None: 2 x R)
    lora_targets: str | None = None  # --lora-targets (None: attention, experts, shared, dense)
    base_dtype: str = "auto"  # --base-dtype of the frozen base under --lora: float32 | bfloat16 | auto
    # how the main rank shows its steps: progress(enabled=...) -> a context manager with update(record, total)
    # (the CLI passes its renderer; a module-level class, so --nproc's ranks can be given it)
    progress: Callable | None = None


def parse_data_weights(text: str | None) -> list[float] | None:
    """--data-weights "3,1" -> [3.0, 1.0]: positive numbers, comma-separated (bad input names the flag)."""
    if text is None:
        return None
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise UserError(f"--data-weights: expected comma-separated numbers (e.g. 3,1), got {text!r}") from None
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise UserError(f"--data-weights: every weight must be a positive number, got {text!r}")
    return weights


@dataclass
class Setup:
    recipe: Recipe
    out: Path
    tokenizer: Tokenizer
    ckpt_dir: Path | None  # --resume: the checkpoint the run continues from ...
    resume_state: dict  # ... and its train_state.json (empty for a new run)
    init_dir: Path | None = None  # --init: the checkpoint whose weights the run starts from ...
    init_state: dict | None = None  # ... and those weights
    device: torch.device = torch.device("cpu")  # --device, resolved
    finetune: dict | None = None  # --init: the fine-tuning defaults applied (those the command line did not set)
    train_experts: dict[int, list[int]] | None = None  # the experts that train (esft.py); None: everything
    lora: LoRAConfig | None = None  # --lora: the adapters (and the base they apply to)
    base_dtype: torch.dtype = torch.float32  # --lora: the frozen base's dtype
    resumed_train: object | None = None  # --resume: the run's train section as its checkpoint holds it


# --init starts from trained weights: a fine-tune's settings, not a pretraining recipe's (its lr 3e-3 raised an
# upcycled pretrained model's validation loss from 3.03 to 3.31 in 10 steps). transformers' Trainer and the
# usual full fine-tunes (Alpaca, litgpt's) use lr 1e-5 to 5e-5, no weight decay or a little, a short warmup.
FINETUNE_LR = 2e-5
FINETUNE_WEIGHT_DECAY = 0.0
FINETUNE_WARMUP = 0.03  # of the run's steps (transformers' warmup_ratio)


def finetune_defaults(max_steps: int) -> dict:
    """The train.* settings an --init run takes unless the command line sets them."""
    return {"train.lr": FINETUNE_LR, "train.weight_decay": FINETUNE_WEIGHT_DECAY,
            "train.warmup_steps": math.ceil(FINETUNE_WARMUP * max_steps)}


def check_recipe_source(args: TrainArgs) -> None:
    """RECIPE from standard input (-) or a pipe can be read once: not when DATA or --val-data is stdin too, nor
    by every process that torchrun starts (--nproc reads it once and hands it to its ranks)."""
    once = args.recipe == "-" or Path(args.recipe).is_fifo()
    if args.recipe == "-" and "-" in [*args.data, *args.val_data]:
        raise UserError("RECIPE -: standard input can be read once, and DATA (or --val-data) - reads it too; "
                        "give the recipe or the text as a file")
    if once and launched_world() > 1:
        raise UserError(f"RECIPE {args.recipe}: under torchrun every process reads the recipe and this one can be "
                        "read once; give a file, or --nproc instead of torchrun")


def procs(args: TrainArgs) -> int:
    """The run's processes: --nproc, or torchrun's WORLD_SIZE."""
    return max(args.nproc, launched_world())


def train_layout(args: TrainArgs, st: Setup | None = None) -> Layout:
    trainable, base_bytes = None, 4
    if st is not None and st.train_experts is not None:
        trainable = esft.trainable_parameters(st.recipe, st.train_experts)
    if st is not None and st.lora is not None:
        trainable, base_bytes = lora_parameters(st.recipe, st.lora), st.base_dtype.itemsize
    return Layout(procs(args), args.expert_parallel, args.fsdp, trainable, base_bytes,
                  st is not None and st.lora is not None)


def check_batch_split(batch_size: int, world: int, grad_accum: int, what: str = "the number of processes") -> None:
    """train.batch_size must split evenly into the processes' micro-batches; ``what`` names the processes in the
    message (--nproc before they start; the process group's size under torchrun)."""
    if batch_size % (world * grad_accum):
        raise UserError(f"train.batch_size ({batch_size}) must be divisible by {what} ({world})"
                        + (f" x train.grad_accum ({grad_accum})" if grad_accum > 1 else ""))


# ---------------------------------------------------------------- setup: the source, the output, the layout


def setup(args: TrainArgs) -> Setup:
    """Resolve recipe, output directory and tokenizer; refuse bad combinations before any work."""
    if args.epochs is not None and not args.epochs > 0:
        raise UserError(f"--epochs: must be > 0, got {args.epochs}")
    if args.epochs is not None and "train.max_steps" in args.overrides:
        raise UserError("--epochs sets train.max_steps from the data: give --epochs or --max-steps, not both")
    out = Path(args.output) if args.output else None
    if args.resume:
        st = _resumed(args, out)
    elif args.init:
        st = _from_init(args, out)
    else:
        st = _from_recipe(args, out)
    _check_output(args, st.out)
    st.device = _check_layout(args, st.recipe)
    if st.device.type == "cpu":
        check_training_fits(st.recipe, train_layout(args, st), local_world(procs(args)))
    return st


def _resumed(args: TrainArgs, out: Path | None) -> Setup:
    """--resume: the run's own checkpoint, recipe (overrides applied), tokenizer and train_state.json."""
    if out is None:
        raise UserError("--resume needs -o/--output: the run directory to continue")
    if args.init:
        raise UserError("--init starts a new run from a checkpoint's weights; --resume continues this run: "
                        "pass one of them")
    if args.train_experts:
        raise UserError("--train-experts: a resumed run trains the experts it chose at its start (kept in its "
                        "checkpoint); start a new run (--init) to choose others")
    if args.lora is not None or args.lora_alpha is not None or args.lora_targets is not None:
        raise UserError("--lora: a resumed run keeps the adapters it started with (kept in its checkpoint)")
    ckpt = open_checkpoint(find_resume_dir(out))  # its format version checked, as every reader does
    if ckpt.is_hf:
        raise UserError(f"{ckpt.directory / CONFIG_FILE}: a Hugging Face model, not a moecli run's checkpoint; "
                        "to train from it, use --init")
    recipe = ckpt.recipe
    if args.overrides:
        recipe = apply_overrides(recipe, args.overrides, source="command-line overrides")
    st = Setup(recipe, out, ckpt.tokenizer(), ckpt.directory, read_train_state(ckpt.directory))
    st.resumed_train = ckpt.recipe.train
    if ckpt.config.get("lora") is not None:  # the adapters train on: their base is read again, whole
        st.lora = LoRAConfig.from_dict(ckpt.config["lora"], str(ckpt.directory / CONFIG_FILE))
        base = open_checkpoint(st.lora.base)
        st.init_dir, st.init_state = base.directory, model_state(base.load_model(torch.float32))
        st.base_dtype = _base_dtype(args, recipe, ckpt.config.get("base_dtype", "float32"))
    kept = ckpt.config.get("train_experts")
    if kept is not None:
        try:
            st.train_experts = esft.parse_spec(esft.to_spec({int(k): v for k, v in kept.items()}), recipe)
        except (UserError, AttributeError, TypeError, ValueError):
            raise UserError(f"{ckpt.directory / CONFIG_FILE}: train_experts: must map MoE layers to lists of their "
                            f"experts, got {kept!r}") from None
    return st


def _from_init(args: TrainArgs, out: Path | None) -> Setup:
    """--init: a checkpoint's weights, recipe and tokenizer, with the fine-tuning defaults the command line left."""
    if args.tokenizer:
        raise UserError("--tokenizer: with --init the tokenizer is the checkpoint's own")
    ckpt = open_checkpoint(args.init)
    init_model, tokenizer = ckpt.model_and_tokenizer(torch.float32)
    recipe, init_state = init_model.recipe, model_state(init_model)
    max_steps = args.overrides.get("train.max_steps", recipe.train.max_steps)
    defaults = finetune_defaults(max_steps) | ({"train.lr": LORA_LR} if args.lora is not None else {})
    finetune = {k: v for k, v in defaults.items() if k not in args.overrides}
    recipe = apply_overrides(recipe, {**finetune, **args.overrides}, source="command-line overrides")
    out = out or Path("runs") / recipe.name
    if Path(ckpt.directory).resolve() == (out / "checkpoint").resolve():
        raise UserError(f"--init {args.init}: is this run's own checkpoint; use --resume to continue it")
    chosen = _chosen_experts(args, init_model, tokenizer, recipe) if args.train_experts else None
    lora = _lora(args, init_model, ckpt.directory) if args.lora is not None else None
    del init_model
    return Setup(recipe, out, tokenizer, None, {}, ckpt.directory, init_state, finetune=finetune,
                 train_experts=chosen, lora=lora, base_dtype=_base_dtype(args, recipe) if lora else torch.float32)


def _lora(args: TrainArgs, model, base: Path) -> LoRAConfig:
    """--lora R with its alpha and targets, checked against the model --init loaded."""
    if args.train_experts:
        raise UserError("--lora with --train-experts: not yet; give one of them")
    if args.expert_parallel or args.fsdp:
        raise UserError(f"--lora: not with {'--expert-parallel' if args.expert_parallel else '--fsdp'} (the frozen "
                        "base is held by every process; use --nproc alone)")
    if args.lora_alpha is not None and not args.lora_alpha > 0:
        raise UserError(f"--lora-alpha: must be > 0, got {args.lora_alpha}")
    cfg = LoRAConfig(args.lora, args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora,
                     parse_targets(args.lora_targets), str(Path(base).resolve()))
    check_rank(model, cfg)
    return cfg


def _base_dtype(args: TrainArgs, recipe: Recipe, default: str | None = None) -> torch.dtype:
    """--base-dtype: the frozen base's dtype under --lora; auto: bfloat16 under bf16-mixed (it halves the base's
    memory and autocast computes in bf16 anyway), float32 under fp32."""
    name = args.base_dtype if args.base_dtype != "auto" or default is None else default
    if name == "auto":
        name = "bfloat16" if recipe.train.precision == "bf16-mixed" else "float32"
    if name not in ("float32", "bfloat16"):
        raise UserError(f"--base-dtype: one of float32, bfloat16, auto; got {name!r}")
    if name == "bfloat16" and recipe.train.precision != "bf16-mixed":
        raise UserError("--base-dtype bfloat16: needs --precision bf16-mixed (an fp32 step cannot multiply bf16 "
                        "weights)")
    return torch.bfloat16 if name == "bfloat16" else torch.float32


def _chosen_experts(args: TrainArgs, model, tokenizer, recipe: Recipe) -> dict[int, list[int]]:
    """--train-experts: the experts each MoE layer trains (a top-p SPEC: from a routing pass over DATA's first
    tokens, with the model as --init loaded it)."""
    if args.expert_parallel or args.fsdp:
        raise UserError(f"--train-experts: not with {'--expert-parallel' if args.expert_parallel else '--fsdp'} "
                        "(each process holds every expert; use --nproc alone)")
    if not recipe.moe_layer_indices():
        raise UserError(f"--train-experts: {args.init} has no MoE layers (a dense model)")
    if args.train_experts.startswith("top-p:"):
        esft.parse_spec(args.train_experts, recipe)  # a bad P before the data is read
        if not args.data:
            raise UserError(f"--train-experts {args.train_experts}: the routing pass needs DATA")
        tokens = read_tokens(args.data, tokenizer, esft.SELECTION_TOKENS, args.jsonl_field)
        return esft.select(args.train_experts, model, tokens, recipe.train.seq_len)
    return esft.select(args.train_experts, model, torch.zeros(0), recipe.train.seq_len)


def _from_recipe(args: TrainArgs, out: Path | None) -> Setup:
    """A new run from RECIPE (a rank of --nproc gets the launcher's, overrides applied: it may have come from
    stdin), with --tokenizer's vocabulary where it is larger than the recipe's."""
    if args.recipe is None:
        raise UserError("RECIPE: missing (a recipe file or bundled name, e.g. `moe train mixtral`)")
    if args.train_experts:
        raise UserError("--train-experts: fine-tunes the experts of a trained model; start from it with --init")
    if args.lora is not None:
        raise UserError("--lora: fine-tunes a trained model through adapters; start from it with --init")
    if isinstance(args.recipe, str):
        check_recipe_source(args)
    recipe = args.recipe if isinstance(args.recipe, Recipe) else prepare_recipe(args.recipe, args.overrides)
    out = out or Path("runs") / recipe.name
    tokenizer = load_tokenizer(args.tokenizer)
    if tokenizer.vocab_size > recipe.model.vocab_size:
        recipe = apply_overrides(recipe, {"model.vocab_size": tokenizer.vocab_size}, source="tokenizer")
    return Setup(recipe, out, tokenizer, None, {})


def _check_output(args: TrainArgs, out: Path) -> None:
    """The output directory: writable, and holding no other run (unless --resume or --force) nor anything a run
    does not write."""
    check_output(out, directory=True)
    if not args.resume and (out / "checkpoint").exists() and not args.force:
        raise UserError(f"{out}: already holds a run; pass --resume to continue it or --force to start over")
    foreign = None if args.resume or args.force else foreign_entry(out)
    if foreign is not None:  # e.g. -o . in a project: its metrics.jsonl replaced, the token cache in its data/
        raise UserError(f"{out}: output directory holds {foreign}, which a run does not write (choose another "
                        "-o, or pass --force)")


def _check_layout(args: TrainArgs, recipe: Recipe) -> torch.device:
    """The processes, the device and the data mix fit together and the recipe; returns the device."""
    if args.nproc < 1:
        raise UserError(f"--nproc: must be >= 1, got {args.nproc}")
    device = resolve_device(args.device)
    n = procs(args)
    if device.type != "cpu" and n > 1:  # one GPU per rank, chosen by LOCAL_RANK (nccl, gloo for CPU tensors)
        here = local_world(n)
        if device.index is not None:
            raise UserError(f"--device {args.device}: several processes (--nproc, torchrun) take one GPU each, by "
                            "LOCAL_RANK; give --device cuda")
        if torch.cuda.device_count() < here:
            raise UserError(f"--device {args.device}: {here} processes on this machine need a GPU each; torch sees "
                            f"{torch.cuda.device_count()} (give --nproc {torch.cuda.device_count()}, or --device cpu)")
    if args.data_weights is not None and args.data:
        if len(args.data_weights) != len(args.data):
            raise UserError(f"--data-weights: {len(args.data_weights)} weights for {len(args.data)} DATA arguments; "
                            "give one weight per DATA argument (a file, directory, glob or -)")
        twice = next((a for i, a in enumerate(args.data) if a in args.data[:i]), None)
        if twice is not None:
            raise UserError(f"DATA: {twice} is given twice; with --data-weights each DATA argument is one source")
    t = recipe.train
    if args.nproc > 1:
        check_batch_split(t.batch_size, args.nproc, t.grad_accum, "--nproc")
    if args.expert_parallel:
        if args.nproc < 2:
            raise UserError("--expert-parallel needs --nproc 2 or more")
        if recipe.moe.num_experts % args.nproc:
            raise UserError(f"--expert-parallel: num_experts ({recipe.moe.num_experts}) must be divisible by "
                            f"--nproc ({args.nproc})")
    if args.fsdp and n < 2:
        raise UserError("--fsdp shards the model over processes: it needs --nproc 2 or more (or torchrun)")
    return device


# ---------------------------------------------------------------- the run's token data


def run_tokens(args: TrainArgs, st: Setup) -> TokenData:
    """The run's token data (from DATA, the default corpus, or the cache a launcher or checkpoint names)."""
    t = st.recipe.train
    stored = st.resume_state.get("data_weights")  # a resumed run mixes as before unless given new weights
    weights = args.data_weights or stored
    if args.data_weights is None and stored and args.data and len(stored) != len(args.data):
        raise UserError(f"DATA: the run in {st.out} mixes {len(weights)} sources (--data-weights); give as many "
                        "DATA arguments, or none to use the run's token cache")
    data = prepare_tokens(args.data, st.tokenizer, st.out / "data", t.val_fraction, t.seq_len,
                          st.resume_state.get("data") or args.data_fingerprint, args.val_data, args.jsonl_field,
                          parts=weights is not None)
    if args.resume and st.resume_state.get("data") != data.fingerprint:
        raise UserError(f"{st.out}: the training data changed since the checkpoint; resume with the same DATA "
                        f"(and --val-data), or none to use the run's token cache")
    if weights is not None:
        if len(weights) != len(data.train):
            raise UserError(f"--data-weights: {len(weights)} weights for the {len(data.train)} sources of the "
                            f"run's token cache in {st.out / 'data'}")
        data.weights = [w / sum(weights) for w in weights]
    if args.epochs is not None:  # windows are drawn at random: an epoch is as many tokens as the split holds
        t.max_steps = max(1, math.ceil(args.epochs * data.n_train / (t.batch_size * t.seq_len)))
        if st.finetune and "train.warmup_steps" in st.finetune:  # its share of the steps now known
            t.warmup_steps = st.finetune["train.warmup_steps"] = finetune_defaults(t.max_steps)["train.warmup_steps"]
    return data
