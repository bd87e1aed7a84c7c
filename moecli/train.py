"""``moe train``: AdamW with warmup + a decay schedule (train.lr_schedule), balance losses, aux-free bias,
checkpoints and exact resume.

Determinism: every source of randomness in step s (the batch, router jitter and
noise, random routing) is drawn from generators seeded with (seed, s), so a run
resumed from a checkpoint at step k replays steps k+1.. exactly as an
uninterrupted run does (on CPU).

Output directory layout:
    OUT/checkpoint/        model.safetensors, config.json, optimizer.safetensors,
                           train_state.json (+ tokenizer.json); swapped in atomically
    OUT/metrics.jsonl      one JSON object per step (and val_loss on eval steps)
    OUT/best/              with train.keep_best: the model at the lowest validation loss so far
    OUT/data/              the token cache (tokens.bin, tokens.json: with --data-weights, each source's span)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .build import prepare_recipe
from .checkpoint import (CONFIG_FILE, check_values, load_into, load_state_file, load_with_tokenizer, model_state,
                         read_config, save_checkpoint)
from .balance import load_health
from .config import Recipe, apply_overrides, recipe_from_dict
from .data import JSONL_FIELD, eval_windows, load_tokenizer, prepare_tokens, sample_mixed
from .distributed import (DistInfo, all_gather_int, all_max, all_mean, all_sum_, barrier, current, expert_params,
                          full_tensor, gather_experts, init_from_env, is_sharded, local, replicate_model, shard_experts,
                          shard_like, shard_model, spawn, state_bytes, sync_gradients)
from .device import available_memory, resolve_device, return_freed_memory
from .errors import Interrupted, RunFailed, UserError
from .evaluate import evaluate_loss
from .fileio import (atomic_dir, atomic_write_json, atomic_write_text, check_output, metrics_upto,
                     read_json_object, save_safetensors)
from .model import Transformer, autocast, build_model
from .train_memory import Layout, current_rss, describe, peak_rss, training_memory, what_fits

SEED_STRIDE = 1_000_003


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


def lr_at(step: int, t) -> float:
    """The learning rate of step `step` (0-based) under train.lr_schedule: a linear warmup, then cosine,
    linear, wsd (constant, then linear over the last decay_fraction of the steps) or constant."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.lr_schedule == "constant":
        return t.lr
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))  # 0 -> 1 after warmup
    if t.lr_schedule == "wsd":
        progress = max(0.0, progress - (1 - t.decay_fraction)) / t.decay_fraction
    left = 0.5 * (1 + math.cos(math.pi * progress)) if t.lr_schedule == "cosine" else 1 - progress
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * left)


def make_optimizer(model: Transformer, t) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t.lr, betas=(t.beta1, t.beta2), **_fused_kwargs(model),
    )


def _fused_kwargs(model) -> dict:
    """The fused AdamW kernel (one pass over memory) where torch supports it for these parameters. FSDP's
    sharded parameters (DTensors) beside expert parallelism's plain ones cannot share one kernel call: then the
    single-tensor path."""
    kinds = {is_sharded(p) for p in model.parameters()}
    if len(kinds) > 1:
        return {"foreach": False}
    p = next(model.parameters())
    if p.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64) and p.device.type in ("cpu", "cuda"):
        return {"fused": True}
    return {"foreach": True}


class KeptGradients:
    """Gradients allocated once and zeroed in place each step, where ``zero_grad(set_to_none=True)`` would free
    them and the backward allocate them again: 2.6 GB of new pages per step at 692M parameters, page-faulted in and
    fragmenting the heap between the activations (benchmarks/README.md, training at real sizes). A parameter the
    step's backward did not reach gets None before the optimizer sees it, as with set_to_none, so AdamW skips it
    as before and the numbers are the same. One process, not FSDP (whose gradients are its own)."""

    def __init__(self, model):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.reached: set[int] = set()
        for p in self.params:
            p.register_post_accumulate_grad_hook(lambda q: self.reached.add(id(q)))

    def zero(self) -> None:
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            else:
                p.grad.zero_()
        self.reached.clear()

    def drop_unreached(self) -> None:
        for p in self.params:
            if id(p) not in self.reached:
                p.grad = None


def create_optimizer_state(opt: torch.optim.Optimizer, kept: KeptGradients) -> None:
    """AdamW's state made before the first step's activations, not after them into the heap they fragment: one
    step of torch's own code at learning rate 0 on zero gradients (weights unchanged: decay x(1 - 0), update 0),
    then its step counts back to 0, so the state is what AdamW's first real step would have made."""
    kept.zero()
    lrs = [g["lr"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["lr"] = 0.0
    opt.step()
    for g, lr in zip(opt.param_groups, lrs):
        g["lr"] = lr
    for state in opt.state.values():
        state["step"].zero_()


class RoutingWindow:
    """Expert loads summed since the last validation pass: dead experts and collapse show over a window,
    not in one step's batch."""

    def __init__(self, model):
        self.layers = [(i, moe.cfg.top_k) for i, moe in model.moe_layers]
        self.loads = [torch.zeros(moe.cfg.num_experts, dtype=torch.float64) for _, moe in model.moe_layers]
        self.steps = 0

    def add(self, loads: list[torch.Tensor]) -> None:
        for acc, load in zip(self.loads, loads):
            acc += load
        self.steps += 1

    def report(self) -> dict:
        """{"steps": n, "layers": {layer: load_health}, "share": {layer: each expert's share of the window's
        assignments}}; then starts a new window."""
        rep = {"steps": self.steps, "layers": {str(i): load_health(acc, k)
                                               for (i, k), acc in zip(self.layers, self.loads)},
               "share": {str(i): [round(float(v), 5) for v in acc / acc.sum().clamp(min=1)]
                         for (i, _), acc in zip(self.layers, self.loads)}}
        for acc in self.loads:
            acc.zero_()
        self.steps = 0
        return rep


# ---------------------------------------------------------------- checkpoint state


def _gathered(t: torch.Tensor, info: DistInfo, expert: bool) -> torch.Tensor | None:
    """A tensor whole: an expert-parallel block of experts gathered from every rank, or an FSDP shard
    all-gathered; None on ranks other than 0 for FSDP's, which only rank 0 writes (so no other rank holds a
    second whole copy of the model). Every rank calls it for the same tensors in the same order."""
    if expert and info.expert_parallel and info.world > 1:
        return gather_experts(t, info)
    if is_sharded(t):
        full = full_tensor(t)
        return full if info.is_main else None
    return t


def _full_model_state(model, info: DistInfo) -> dict:
    """The model state with whole experts and whole FSDP-sharded tensors (every rank takes part)."""
    sd = {name: _gathered(v, info, ".moe.experts." in name) for name, v in model_state(model).items()}
    return {k: v for k, v in sd.items() if v is not None}


def _full_state(model, opt, info: DistInfo) -> tuple[dict, dict]:
    """Model state and flat optimizer state, whole (gathered from every rank under EP and FSDP)."""
    sd = _full_model_state(model, info)
    state = opt.state_dict()
    sharded = _expert_indices(model, opt) if info.expert_parallel and info.world > 1 else set()
    tensors = {}
    for idx, st in state["state"].items():
        for k, v in st.items():
            whole = _gathered(v, info, idx in sharded and k != "step")
            if whole is not None:
                tensors[f"{idx}.{k}"] = whole.contiguous()
    return sd, {"tensors": tensors, "param_groups": state["param_groups"]}


def _expert_indices(model, opt) -> set[int]:
    experts = expert_params(model)
    order = [p for g in opt.param_groups for p in g["params"]]
    return {i for i, p in enumerate(order) if id(p) in experts}


def _save_model(tmp: Path, model, sd: dict, extra: dict, tokenizer) -> None:
    """config.json (with extra and the tokenizer's config), model.safetensors and tokenizer.json into tmp."""
    save_checkpoint(model, tmp, {**extra, "tokenizer": tokenizer.to_config()}, state=sd)
    if tokenizer.kind == "hf":
        shutil.copyfile(tokenizer.path, tmp / "tokenizer.json")


def save_best(out: Path, model, step: int, tokens_seen: int, tokenizer, data_fp: str, val_loss: float,
              info: DistInfo) -> None:
    """OUT/best (train.keep_best): the model alone, with its step and validation loss (config.json)."""
    sd = _full_model_state(model, info)
    if info.is_main:
        with atomic_dir(out / "best", overwrite=True) as tmp:
            _save_model(tmp, model, sd, {"step": step, "tokens_seen": tokens_seen, "val_loss": val_loss,
                                         "data": data_fp}, tokenizer)
    barrier()


def best_val_loss(out: Path) -> float:
    """The validation loss OUT/best was kept for (inf where there is none yet)."""
    try:
        return float(json.loads((out / "best" / CONFIG_FILE).read_text())["val_loss"])
    except (OSError, ValueError, KeyError, TypeError):
        return math.inf


def save_train_checkpoint(out: Path, model, opt, step: int, tokens_seen: int, tokenizer, data_fp: str,
                          info: DistInfo, early_stop: dict, data_weights: list[float] | None = None) -> Path:
    """OUT/checkpoint: model, optimizer and train_state.json (step, tokens seen, data, data_weights where
    given, and early_stop: the lowest validation loss so far and the passes since, so --resume counts on:
    ``EarlyStop``)."""
    target = out / "checkpoint"
    sd, ostate = _full_state(model, opt, info)  # every rank takes part in the gathers
    if info.is_main:
        with atomic_dir(target, overwrite=True) as tmp:
            _save_model(tmp, model, sd, {"step": step, "tokens_seen": tokens_seen}, tokenizer)
            save_safetensors(ostate["tensors"], tmp / "optimizer.safetensors")
            atomic_write_json(tmp / "train_state.json", {
                "step": step, "tokens_seen": tokens_seen, "param_groups": ostate["param_groups"], "data": data_fp,
                "early_stop": early_stop, **({"data_weights": data_weights} if data_weights else {}),
            })
    barrier()
    return target


@dataclass
class EarlyStop:
    """train.patience: the lowest validation loss so far (its step) and the passes since without a lower one."""
    patience: int
    lowest: float = math.inf
    lowest_step: int = 0
    passes: int = 0

    @classmethod
    def resumed(cls, patience: int, ts: dict) -> "EarlyStop":
        """From a checkpoint's train_state.json (one written without it: counting starts anew)."""
        s = ts.get("early_stop") or {}
        lowest = s.get("lowest_val_loss")
        return cls(patience, math.inf if lowest is None else float(lowest), int(s.get("lowest_step", 0)),
                   int(s.get("passes", 0)))

    def update(self, val_loss: float, step: int) -> bool:
        """Count one validation pass; True when training should stop."""
        if val_loss < self.lowest:
            self.lowest, self.lowest_step, self.passes = val_loss, step, 0
        else:
            self.passes += 1
        return self.patience > 0 and self.passes >= self.patience

    def state(self) -> dict:
        """As train_state.json, the metrics and the summary record it."""
        return {"lowest_val_loss": self.lowest if math.isfinite(self.lowest) else None,
                "lowest_step": self.lowest_step, "passes": self.passes}


class StopSignals:
    """Ctrl-C (SIGINT) or SIGTERM (a scheduler's preemption) during training: the step under way finishes,
    the loop saves a checkpoint of it and ends (``Interrupted``); a second signal stops at once. Under
    torch.distributed the ranks agree at every step's end (``asked``), so all stop after the same step.
    A signal the process ignores stays ignored: ranks of ``moe train --nproc`` ignore SIGINT, and the
    launcher passes a Ctrl-C on to them as one SIGTERM (``distributed.spawn``)."""

    def __init__(self):
        self.enabled = threading.current_thread() is threading.main_thread()
        self.signum: int | None = None  # the signal this process got (set by its handler only)
        self.agreed: int | None = None  # the signal the run stops for (asked): this process's, or another rank's
        self._old: dict = {}

    def install(self) -> None:
        if self.enabled:
            for s in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(s) is not signal.SIG_IGN:
                    self._old[s] = signal.signal(s, self._handle)

    def restore(self) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # asked twice: stop now, without the checkpoint
            raise KeyboardInterrupt
        self.signum = signum

    def asked(self, info: DistInfo) -> bool:
        """Whether to stop after this step: a signal came here, or (under torch.distributed) to any rank.
        Every rank calls it at the same point of every step (one small all-reduce when distributed), and all
        decide on the all-reduce's result; a signal whose handler runs during the all-reduce counts at the
        next step. (Assigning the result to signum lost such a signal: the ranks, which mostly wait inside
        that call on a busy machine, then ran to the end.)"""
        self.agreed = (all_max(self.signum or 0) or None) if info.world > 1 else self.signum
        return self.agreed is not None


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


def check_recipe_source(args: TrainArgs) -> None:
    """RECIPE from standard input (-) or a pipe can be read once: not when DATA or --val-data is stdin too, nor
    by every process that torchrun starts (--nproc reads it once and hands it to its ranks)."""
    once = args.recipe == "-" or Path(args.recipe).is_fifo()
    if args.recipe == "-" and "-" in [*args.data, *args.val_data]:
        raise UserError("RECIPE -: standard input can be read once, and DATA (or --val-data) - reads it too; "
                        "give the recipe or the text as a file")
    if once and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(f"RECIPE {args.recipe}: under torchrun every process reads the recipe and this one can be "
                        "read once; give a file, or --nproc instead of torchrun")


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
    sharded = _expert_indices(model, opt) if info.expert_parallel and info.world > 1 else set()
    state: dict[int, dict] = {}
    for key, v in flat.items():
        idx, _, name = key.partition(".")
        if not idx.isdigit() or int(idx) >= len(params) or name not in ADAMW_STATE:
            raise UserError(f"{path}: {key}: not a tensor of this model's optimizer (AdamW, {len(params)} parameters)")
        p, i = params[int(idx)], int(idx)
        whole = (p.shape[0] * info.world, *p.shape[1:]) if i in sharded else tuple(p.shape)  # a DTensor's: whole
        want = () if name == "step" else whole
        if tuple(v.shape) != want:
            raise UserError(f"{path}: {key} has shape {tuple(v.shape)}; {names.get(id(p), 'its parameter')} "
                            f"needs {want}")
        if i in sharded and name != "step":
            El = v.shape[0] // info.world
            v = v[info.rank * El:(info.rank + 1) * El].clone()
        elif is_sharded(p) and name != "step":  # FSDP: this rank's shard, as its parameter's
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


def _trim_metrics(path: Path, upto_step: int) -> None:
    if path.exists():
        atomic_write_text(path, "".join(line + "\n" for line, _ in metrics_upto(path, upto_step)))


# ---------------------------------------------------------------- set-up


@dataclass
class Setup:
    recipe: object
    out: Path
    tokenizer: object
    ckpt_dir: Path | None
    resume_state: dict
    init_dir: Path | None = None  # --init: the checkpoint whose weights the run starts from ...
    init_state: dict | None = None  # ... and those weights
    device: torch.device = torch.device("cpu")  # --device, resolved
    finetune: dict | None = None  # --init: the fine-tuning defaults applied (those the command line did not set)


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


def setup(args: TrainArgs) -> Setup:
    """Resolve recipe, output directory and tokenizer; refuse bad combinations before any work."""
    if args.epochs is not None and not args.epochs > 0:
        raise UserError(f"--epochs: must be > 0, got {args.epochs}")
    if args.epochs is not None and "train.max_steps" in args.overrides:
        raise UserError("--epochs sets train.max_steps from the data: give --epochs or --max-steps, not both")
    out = Path(args.output) if args.output else None
    ckpt_dir, resume_state, init_dir, init_state, finetune = None, {}, None, None, None
    if args.resume:
        if out is None:
            raise UserError("--resume needs -o/--output: the run directory to continue")
        if args.init:
            raise UserError("--init starts a new run from a checkpoint's weights; --resume continues this run: "
                            "pass one of them")
        ckpt_dir = find_resume_dir(out)
        cfg = read_config(ckpt_dir)
        recipe = recipe_from_dict(cfg.get("recipe"), str(ckpt_dir / CONFIG_FILE))
        if args.overrides:
            recipe = apply_overrides(recipe, args.overrides, source="command-line overrides")
        tcfg = cfg.get("tokenizer") or {"type": "byte"}
        tokenizer = load_tokenizer(ckpt_dir / "tokenizer.json" if tcfg.get("type") == "hf" else None)
        resume_state = read_train_state(ckpt_dir)
    elif args.init:
        if args.tokenizer:
            raise UserError("--tokenizer: with --init the tokenizer is the checkpoint's own")
        init_model, _, init_dir, tokenizer = load_with_tokenizer(args.init)
        recipe, init_state = init_model.recipe, model_state(init_model)
        del init_model
        max_steps = args.overrides.get("train.max_steps", recipe.train.max_steps)
        finetune = {k: v for k, v in finetune_defaults(max_steps).items() if k not in args.overrides}
        recipe = apply_overrides(recipe, {**finetune, **args.overrides}, source="command-line overrides")
        out = out or Path("runs") / recipe.name
        if Path(init_dir).resolve() == (out / "checkpoint").resolve():
            raise UserError(f"--init {args.init}: is this run's own checkpoint; use --resume to continue it")
    else:
        if args.recipe is None:
            raise UserError("RECIPE: missing (a recipe file or bundled name, e.g. `moe train mixtral`)")
        if isinstance(args.recipe, str):
            check_recipe_source(args)
        # a rank of --nproc gets the launcher's recipe, overrides applied (it may have come from stdin)
        recipe = args.recipe if isinstance(args.recipe, Recipe) else prepare_recipe(args.recipe, args.overrides)
        out = out or Path("runs") / recipe.name
        tokenizer = load_tokenizer(args.tokenizer)
        if tokenizer.vocab_size > recipe.model.vocab_size:
            recipe = apply_overrides(recipe, {"model.vocab_size": tokenizer.vocab_size}, source="tokenizer")
    check_output(out, directory=True)
    if not args.resume and (out / "checkpoint").exists() and not args.force:
        raise UserError(f"{out}: already holds a run; pass --resume to continue it or --force to start over")
    foreign = None if args.resume or args.force else foreign_entry(out)
    if foreign is not None:  # e.g. -o . in a project: its metrics.jsonl replaced, the token cache in its data/
        raise UserError(f"{out}: output directory holds {foreign}, which a run does not write (choose another "
                        "-o, or pass --force)")
    if args.nproc < 1:
        raise UserError(f"--nproc: must be >= 1, got {args.nproc}")
    device = resolve_device(args.device)
    procs = _procs(args)
    if device.type != "cpu" and procs > 1:  # one GPU per rank, chosen by LOCAL_RANK (nccl, gloo for CPU tensors)
        local = _local_procs(procs)
        if device.index is not None:
            raise UserError(f"--device {args.device}: several processes (--nproc, torchrun) take one GPU each, by "
                            "LOCAL_RANK; give --device cuda")
        if torch.cuda.device_count() < local:
            raise UserError(f"--device {args.device}: {local} processes on this machine need a GPU each; torch sees "
                            f"{torch.cuda.device_count()} (give --nproc {torch.cuda.device_count()}, or --device cpu)")
    if args.data_weights is not None and args.data:
        if len(args.data_weights) != len(args.data):
            raise UserError(f"--data-weights: {len(args.data_weights)} weights for {len(args.data)} DATA arguments; "
                            "give one weight per DATA argument (a file, directory, glob or -)")
        twice = next((a for i, a in enumerate(args.data) if a in args.data[:i]), None)
        if twice is not None:
            raise UserError(f"DATA: {twice} is given twice; with --data-weights each DATA argument is one source")
    t = recipe.train
    if args.nproc > 1 and t.batch_size % (args.nproc * t.grad_accum):
        raise UserError(f"train.batch_size ({t.batch_size}) must be divisible by --nproc ({args.nproc})"
                        + (f" x train.grad_accum ({t.grad_accum})" if t.grad_accum > 1 else ""))
    if args.expert_parallel:
        if args.nproc < 2:
            raise UserError("--expert-parallel needs --nproc 2 or more")
        if recipe.moe.num_experts % args.nproc:
            raise UserError(f"--expert-parallel: num_experts ({recipe.moe.num_experts}) must be divisible by "
                            f"--nproc ({args.nproc})")
    if args.fsdp and procs < 2:
        raise UserError("--fsdp shards the model over processes: it needs --nproc 2 or more (or torchrun)")
    if device.type == "cpu":
        check_training_fits(recipe, args)
    return Setup(recipe, out, tokenizer, ckpt_dir, resume_state, init_dir, init_state, device, finetune)


def _procs(args: TrainArgs) -> int:
    """The run's processes: --nproc, or torchrun's WORLD_SIZE."""
    return max(args.nproc, int(os.environ.get("WORLD_SIZE", "1")))


def _local_procs(procs: int) -> int:
    """The run's processes on this machine (torchrun's LOCAL_WORLD_SIZE; all of them with --nproc)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", procs))


def train_layout(args: TrainArgs) -> Layout:
    return Layout(_procs(args), args.expert_parallel, args.fsdp)


LEAN_ABOVE = 0.8  # of the memory available: above it, training trades speed for a lower peak (_lean)


def _lean(memory: dict, device: torch.device, world: int) -> bool:
    """Whether a CPU run's estimate is close enough to the memory available (per process on this machine) that
    it should free its gradients each step and return freed blocks to the system: at 692M parameters in fp32, a
    peak of 11.5 GiB instead of 12.6-13.0, at 61 instead of 89-102 tokens/s (benchmarks/README.md, training at real
    sizes)."""
    if device.type != "cpu":
        return False
    avail = available_memory()
    return avail is not None and memory["peak"] * _local_procs(world) > LEAN_ABOVE * avail


def check_training_fits(recipe, args: TrainArgs) -> None:
    """Refuse, before anything is allocated, a CPU run whose estimated peak (train_memory: states, bf16 copies and
    the micro-batch's activations, times the processes on this machine) exceeds the memory available, naming
    the flags under which it would fit."""
    layout = train_layout(args)
    mem = training_memory(recipe, layout)
    local = _local_procs(layout.procs)
    avail = available_memory()
    if avail is None or mem["peak"] * local <= avail:
        return
    fits = what_fits(recipe, layout, avail // local)
    hint = ("it fits with " + ", or ".join(fits)) if fits else (
        "train a smaller model (e.g. --set model.n_layers=... or model.d_model=...)"
        + ("" if layout.fsdp else ", or shard it over processes (--nproc N --fsdp)"))
    per = f" x {local} processes" if local > 1 else ""
    raise UserError(f"{recipe.name}: training needs about {describe(mem)}{per}, {avail / 2**30:.1f} GiB available "
                    f"to this process; {hint}")


def train(args: TrainArgs, progress=None) -> dict:
    """Run training; returns a summary dict. ``progress`` is a callback(record, total) per step."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not current().world > 1:  # started by torchrun
        return _rank_main(args)
    if args.nproc > 1 and not current().world > 1:
        st = setup(args)  # validate and tokenise once, here, before starting the ranks
        st.out.mkdir(parents=True, exist_ok=True)
        data = _tokens(args, st)
        rank_args = dataclasses.replace(args, data=[], val_data=[], data_fingerprint=data.fingerprint, output=st.out,
                                        recipe=st.recipe if args.recipe is not None else None)
        return spawn(args.nproc, _rank_main, rank_args)
    return _train(args, progress)


def _tokens(args: TrainArgs, st: Setup):
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


def _rank_main(args: TrainArgs) -> dict:
    from .render import TrainProgress

    info = init_from_env(args.expert_parallel, args.fsdp, cuda=resolve_device(args.device).type == "cuda")
    with TrainProgress(enabled=info.is_main and not args.quiet) as prog:
        return _train(args, prog.update)


# ---------------------------------------------------------------- the loop


def _train(args: TrainArgs, progress=None) -> dict:
    info = current()
    st = setup(args)
    recipe, out, tokenizer = st.recipe, st.out, st.tokenizer
    t = recipe.train
    memory = training_memory(recipe, train_layout(args))
    lean = _lean(memory, st.device, info.world)
    if lean:  # large freed tensors back to the system at once, gradients freed each step (device.py)
        return_freed_memory()
    if t.batch_size % (info.world * t.grad_accum):
        raise UserError(f"train.batch_size ({t.batch_size}) must be divisible by the number of processes "
                        f"({info.world}) x train.grad_accum ({t.grad_accum})")
    out.mkdir(parents=True, exist_ok=True)
    if info.world > 1 and args.data_fingerprint is None:  # torchrun: rank 0 fills the token cache first
        if info.is_main:
            _tokens(args, st)
        barrier()
    data = _tokens(args, st)
    rss_at_start = current_rss()  # before the model: what the estimate adds to
    if info.is_main and not args.quiet:
        lean_note = ("; close to the memory available, so gradients are freed each step (lower peak, slower)"
                     if lean else "")
        print(f"memory: about {describe(memory)}{lean_note}", file=sys.stderr, flush=True)

    model = build_model(recipe)
    if st.init_dir is not None:  # weights only: a new run (fresh optimizer, step 0)
        load_into(model, st.init_state, st.init_dir)
        st.init_state = None  # copied: its file's mapped pages (counted in RSS) go
    if args.resume:
        load_into(model, load_state_file(st.ckpt_dir / "model.safetensors"), st.ckpt_dir / "model.safetensors")
    device = st.device
    if device.type == "cuda" and info.world > 1:  # this rank's own GPU
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    model.to(device)  # before the optimizer, whose state (resumed too) then lives beside the weights
    if info.expert_parallel and info.world > 1:
        shard_experts(model, info)
    if info.fsdp and info.world > 1:
        shard_model(model, info)
    elif info.world > 1:
        replicate_model(model, info)
    for _, moe in model.moe_layers:
        moe.dp_world = info.world
    opt = make_optimizer(model, t)
    metrics_path = out / "metrics.jsonl"
    start_step, tokens_seen = 0, 0
    early = EarlyStop(t.patience)
    if args.resume:
        ts = st.resume_state
        load_optimizer_state(model, opt, st.ckpt_dir, ts, info)
        start_step, tokens_seen = ts["step"], ts["tokens_seen"]
        early = EarlyStop.resumed(t.patience, ts)
        if start_step > t.max_steps:  # before anything of the run is touched
            raise UserError(f"train.max_steps ({t.max_steps}): the checkpoint in {out} is already at step "
                            f"{start_step}; give more steps to continue it")
        if info.is_main:
            _trim_metrics(metrics_path, start_step)
    elif info.is_main:  # a new run (--force): nothing of an earlier run's metrics or best model stays
        if metrics_path.exists():
            metrics_path.unlink()
        if (out / "best").exists():
            shutil.rmtree(out / "best")
    for g in opt.param_groups:  # resumed runs may extend max_steps / change lr
        g["betas"] = (t.beta1, t.beta2)
    kept = None if lean or (info.fsdp and info.world > 1) else KeptGradients(model)
    if kept is not None and not opt.state:
        create_optimizer_state(opt, kept)
    barrier()

    # each validation stream (one, or with --data-weights each source's tail) gets its share of the windows
    val_starts = [eval_windows(v, t.seq_len, max(1, t.eval_batches * t.batch_size // len(data.val)))
                  for v in data.val]
    model.train()
    last_ckpt = st.ckpt_dir if args.resume else None
    last_ckpt_step = start_step if args.resume else None
    summary = {"output": str(out), "recipe": recipe.name, "start_step": start_step, "steps": t.max_steps,
               "train_tokens": data.n_train, "val_tokens": data.n_val,
               "val_from": "--val-data" if data.val_from_own_text else
               f"the last {t.val_fraction:g} of the tokens" + (" of each source" if data.sources else ""),
               "data_mix": [{"source": src, "weight": w, "train_tokens": tr.numel(),
                             "val_tokens": None if data.val_from_own_text else data.val[i].numel()}
                            for i, (src, w, tr) in enumerate(zip(data.sources, data.weights, data.train))] or None,
               "processes": info.world, "expert_parallel": info.expert_parallel, "fsdp": info.fsdp,
               "precision": t.precision,
               "device": str(device),
               "memory_estimate": {k: memory[k] for k in ("peak", "states", "bf16_copies", "activations",
                                                          "saved_for_backward")},
               "low_memory_mode": lean,
               "init": str(st.init_dir) if st.init_dir is not None else None,
               "finetune_defaults": {k.split(".", 1)[1]: v for k, v in st.finetune.items()} if st.finetune else None}
    local_b = t.batch_size // info.world
    rows = slice(info.rank * local_b, (info.rank + 1) * local_b)
    val_loss, val_by_source, stopped = None, None, False
    best = best_val_loss(out) if t.keep_best else math.inf  # resumed: the best of the steps before
    step_times = []
    window = RoutingWindow(model)
    routing = None
    mf = open(metrics_path, "a") if info.is_main else None
    signals = StopSignals()
    signals.install()
    try:
        for step in range(start_step, t.max_steps):
            t0 = time.perf_counter()
            lr = lr_at(step, t)
            for g in opt.param_groups:
                g["lr"] = lr
            torch.manual_seed(t.seed * SEED_STRIDE + step)
            gen = torch.Generator().manual_seed(t.seed * SEED_STRIDE + step + 0x5EED)
            x, y = sample_mixed(data.train, data.weights, t.batch_size, t.seq_len, gen)  # the global batch ...
            x, y = x[rows].to(device), y[rows].to(device)  # ... and this rank's share of it
            if kept is not None:
                kept.zero()
            else:
                opt.zero_grad(set_to_none=True)
            m = micro_steps(model, x, y, t.grad_accum, t.precision)
            ce_all, loss_all = all_mean(m["ce"]), all_mean(m["loss"])
            if not math.isfinite(loss_all):
                raise RunFailed(_nan_message(loss_all, step + 1, last_ckpt, last_ckpt_step))
            if kept is not None and info.world == 1:  # (several processes: DDP reduces every parameter's gradient)
                kept.drop_unreached()
            sync_gradients(model, info)
            gnorm = clip_gradients(model, info, t.grad_clip)
            if not torch.isfinite(gnorm):
                raise RunFailed(_nan_message(float(gnorm), step + 1, last_ckpt, last_ckpt_step, "gradient norm"))
            opt.step()
            loads = [all_sum_(load) for load in m["loads"]]
            if recipe.balance.bias_update_rate > 0:
                model.update_router_biases(loads, recipe.balance.bias_update_rate)
            tokens_seen += x.numel() * info.world
            dt = time.perf_counter() - t0
            step_times.append(dt)
            rec = {"step": step + 1, "loss": ce_all, "total_loss": loss_all, "lr": lr,
                   "grad_norm": float(gnorm), "tokens_per_s": x.numel() * info.world / dt, "tokens_seen": tokens_seen}
            if m["aux"]:
                rec["aux"] = {k: all_mean(v) for k, v in m["aux"].items()}
            window.add(loads)
            if loads:
                rec["max_vio"] = [round(load_health(load, k)["max_vio"], 4)
                                  for load, (_, k) in zip(loads, window.layers)]
                counts = all_sum_(torch.tensor([m["dropped"], m["assignments"]]))
                rec["dropped_frac"] = int(counts[0]) / max(1, int(counts[1]))
            done = step + 1 == t.max_steps
            if (step + 1) % t.eval_interval == 0 or done:
                val_loss, val_by_source = validate(model, data, t, val_starts)
                if not math.isfinite(val_loss):
                    raise RunFailed(_nan_message(val_loss, step + 1, last_ckpt, last_ckpt_step, "validation loss"))
                rec["val_loss"] = val_loss
                if val_by_source:
                    rec["val_loss_by_source"] = val_by_source
                if early.update(val_loss, step + 1) and not done:
                    done = stopped = True
                    rec["early_stop"] = early.state()
                if t.keep_best and val_loss < best:
                    best = val_loss
                    save_best(out, model, step + 1, tokens_seen, tokenizer, data.fingerprint, val_loss, info)
                    rec["best"] = True
                if window.layers:  # the routing since the last validation pass
                    routing = window.report()
                    rec["routing"] = {"steps": routing["steps"], "flagged": {
                        i: {"status": h["status"], "dead": h["dead"]}
                        for i, h in routing["layers"].items() if h["status"] != "ok"}, "share": routing["share"]}
            if mf:
                mf.write(json.dumps(rec) + "\n")
                mf.flush()
            interrupted = signals.asked(info) and not done  # Ctrl-C or SIGTERM: keep this step, then end
            if (step + 1) % t.ckpt_interval == 0 or done or interrupted:
                last_ckpt = save_train_checkpoint(out, model, opt, step + 1, tokens_seen, tokenizer, data.fingerprint,
                                                  info, early.state(), data.weights if data.sources else None)
                last_ckpt_step = step + 1
                rec["checkpoint"] = str(last_ckpt)
            if progress and info.is_main:
                progress(rec, t.max_steps)
            if stopped:
                break
            if interrupted:
                raise Interrupted(f"stopped after step {step + 1} of {t.max_steps}, saved in {last_ckpt}; "
                                  f"continue with: moe train -o {out} --resume", signals.agreed)
    finally:
        signals.restore()
        if mf:
            mf.close()
    measured = step_times[1:] or step_times
    summary.update({
        "final_step": step + 1 if stopped else t.max_steps, "tokens_seen": tokens_seen,
        # passes' worth of the training tokens seen (--epochs): windows are drawn at random
        "epochs": tokens_seen / max(1, data.n_train),
        "stopped_early": rec["early_stop"] if stopped else None,
        "final_loss": rec["loss"] if step_times else None, "val_loss": val_loss, "val_loss_by_source": val_by_source,
        "tokens_per_s": (t.batch_size * t.seq_len * len(measured) / sum(measured)) if measured else None,
        "checkpoint": str(out / "checkpoint"), "metrics": str(metrics_path),
        "peak_rss": peak_rss(), "rss_at_start": rss_at_start,  # this process's (with --nproc: rank 0's), from the OS
        # weights, gradients and AdamW state each rank holds at the end (its shards under --fsdp), measured
        "state_bytes_per_rank": all_gather_int(state_bytes(model, opt)),
        "best": ({"checkpoint": str(out / "best"), "val_loss": best} if t.keep_best and math.isfinite(best) else None),
        "routing": {i: {"status": h["status"], "max_vio": round(h["max_vio"], 4), "dead": h["dead"]}
                    for i, h in routing["layers"].items()} if routing else None,
    })
    return summary


def validate(model, data, t, starts: list[list[int]]) -> tuple[float, dict | None]:
    """(val_loss, per source or None): the loss over each validation stream's windows (``starts``, one list per
    stream). With --data-weights and each source's own tail, val_loss is the sources' losses weighted as
    training samples them (the loss of the training mixture), and each source's loss is returned too."""
    losses = [evaluate_loss(model, v, t.seq_len, s, t.batch_size, t.precision)[0] for v, s in zip(data.val, starts)]
    if len(losses) == 1:
        return losses[0], None
    return sum(w * loss for w, loss in zip(data.weights, losses)), dict(zip(data.sources, losses))


def micro_steps(model, x_BS: torch.Tensor, y_BS: torch.Tensor, accum: int, precision: str = "fp32") -> dict:
    """Forward and backward over ``accum`` equal micro-batches; the gradients add up to the batch mean's.
    The forward runs under ``precision``'s autocast (train.precision), the backward outside it.

    Returns the batch means of the cross-entropy, the total loss and each balance term, and the
    expert loads, dropped and routed assignments summed over the micro-batches.
    """
    out = {"ce": 0.0, "loss": 0.0, "aux": {}, "loads": [torch.zeros(moe.cfg.num_experts, dtype=torch.float64)
                                                         for _, moe in model.moe_layers],
           "dropped": 0, "assignments": 0}
    for x, y in zip(x_BS.chunk(accum), y_BS.chunk(accum)):
        with autocast(model, precision):
            res = model(x, targets_BS=y)  # the loss in chunks of tokens, without the batch's logits (loss.py)
        ce = res.ce
        loss = ce + res.balance_loss
        (loss / accum).backward()
        out["ce"] += float(ce.detach()) / accum
        out["loss"] += float(loss.detach()) / accum
        for k, v in res.aux.items():
            out["aux"][k] = out["aux"].get(k, 0.0) + v / accum
        for acc, (_, moe) in zip(out["loads"], model.moe_layers):
            acc += moe.stats["load_E"]
            out["dropped"] += moe.stats["dropped"]
            out["assignments"] += moe.stats["assignments"]
    return out


def clip_gradients(model, info: DistInfo, clip: float) -> torch.Tensor:
    """Clip to a total gradient norm of ``clip`` (0 = no clipping); returns the norm before clipping.

    Under expert parallelism each rank holds different experts, so their squared
    norms are summed over ranks; replicated parameters count once.
    """
    max_norm = clip if clip > 0 else float("inf")
    if info.fsdp and info.world > 1:  # every rank holds distinct shards (and EP experts): one sum over ranks
        grads = [local(p.grad) for p in model.parameters() if p.grad is not None]
        sq = sum((g.double().pow(2).sum() for g in grads), torch.zeros((), dtype=torch.float64))
        norm = all_sum_(sq.reshape(1))[0].sqrt().float()
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
        return norm
    if not (info.expert_parallel and info.world > 1):
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    sharded = expert_params(model)
    params = [p for p in model.parameters() if p.grad is not None]
    rep = sum((p.grad.double().pow(2).sum() for p in params if id(p) not in sharded), torch.zeros((), dtype=torch.float64))
    exp = sum((p.grad.double().pow(2).sum() for p in params if id(p) in sharded), torch.zeros((), dtype=torch.float64))
    norm = (rep + all_sum_(exp.reshape(1))[0]).sqrt().float()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for p in params:
        p.grad.mul_(coef.to(p.grad.dtype))
    return norm


def _nan_message(value, step, last_ckpt, last_step, what="loss") -> str:
    kept = f"last good checkpoint: {last_ckpt} (step {last_step})" if last_ckpt else "no checkpoint was written yet"
    return f"{what} became {value} at step {step}; training stopped, nothing saved from this step; {kept}"
