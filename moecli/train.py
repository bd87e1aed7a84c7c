"""``moe train``: AdamW with warmup + cosine, balance losses, aux-free bias, checkpoints and exact resume.

Determinism: every source of randomness in step s (the batch, router jitter and
noise, random routing) is drawn from generators seeded with (seed, s), so a run
resumed from a checkpoint at step k replays steps k+1.. exactly as an
uninterrupted run does (on CPU).

Output directory layout:
    OUT/checkpoint/        model.safetensors, config.json, optimizer.safetensors,
                           train_state.json (+ tokenizer.json); swapped in atomically
    OUT/metrics.jsonl      one JSON object per step (and val_loss on eval steps)
    OUT/data/              the token cache (tokens.bin, tokens.json)
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from .build import prepare_recipe
from .checkpoint import CONFIG_FILE, load_into, load_state_file, read_config, save_checkpoint
from .config import apply_overrides, recipe_from_dict
from .data import eval_windows, load_tokenizer, prepare_tokens, sample_batch
from .errors import RunFailed, UserError
from .evaluate import evaluate_loss
from .fileio import atomic_dir, atomic_write_json, atomic_write_text
from .model import Transformer, build_model

SEED_STRIDE = 1_000_003


@dataclass
class TrainArgs:
    recipe: str | None
    data: list[str] = field(default_factory=list)
    output: Path | None = None
    overrides: dict = field(default_factory=dict)
    resume: bool = False
    force: bool = False
    tokenizer: str | None = None
    quiet: bool = False


def lr_at(step: int, t) -> float:
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(model: Transformer, t) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t.lr, betas=(t.beta1, t.beta2), **_fused_kwargs(model),
    )


def _fused_kwargs(model) -> dict:
    """The fused AdamW kernel (one pass over memory) where torch supports it for these parameters."""
    p = next(model.parameters())
    if p.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64) and p.device.type in ("cpu", "cuda"):
        return {"fused": True}
    return {"foreach": True}


def max_vio(load_E: torch.Tensor) -> float:
    """(max load - mean load) / mean load: 0 when perfectly balanced."""
    load = load_E.float()
    mean = load.mean()
    return float((load.max() - mean) / mean) if mean > 0 else 0.0


# ---------------------------------------------------------------- checkpoint state


def save_train_checkpoint(out: Path, model, opt, step: int, tokens_seen: int, tokenizer, data_fp: str) -> Path:
    target = out / "checkpoint"
    with atomic_dir(target, overwrite=True) as tmp:
        save_checkpoint(model, tmp, {"step": step, "tokens_seen": tokens_seen, "tokenizer": tokenizer.to_config()})
        state = opt.state_dict()
        tensors = {f"{idx}.{k}": v.contiguous() for idx, s in state["state"].items() for k, v in s.items()}
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        atomic_write_json(tmp / "train_state.json", {
            "step": step, "tokens_seen": tokens_seen, "param_groups": state["param_groups"], "data": data_fp,
        })
        if tokenizer.kind == "hf":
            shutil.copyfile(tokenizer.path, tmp / "tokenizer.json")
    return target


def find_resume_dir(out: Path) -> Path:
    for d in (out / "checkpoint", out / ".checkpoint.old"):  # .old survives a crash mid-swap
        if (d / CONFIG_FILE).is_file() and (d / "train_state.json").is_file():
            return d
    raise UserError(f"{out}: no checkpoint to resume from (expected {out / 'checkpoint'})")


def load_optimizer_state(opt, directory: Path) -> dict:
    ts = json.loads((directory / "train_state.json").read_text())
    flat = load_state_file(directory / "optimizer.safetensors")
    state: dict[int, dict] = {}
    for key, v in flat.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": ts["param_groups"]})
    return ts


def _trim_metrics(path: Path, upto_step: int) -> None:
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if rec.get("step", 0) <= upto_step:
            keep.append(line)
    atomic_write_text(path, "".join(l + "\n" for l in keep))


# ---------------------------------------------------------------- the loop


def train(args: TrainArgs, progress=None) -> dict:
    """Run training; returns a summary dict. ``progress`` is a callback(dict) per step (for rendering)."""
    out = Path(args.output) if args.output else None
    start_step, tokens_seen = 0, 0
    if args.resume:
        if out is None:
            raise UserError("--resume needs -o/--output: the run directory to continue")
        ckpt_dir = find_resume_dir(out)
        cfg = read_config(ckpt_dir)
        recipe = recipe_from_dict(cfg.get("recipe"), str(ckpt_dir / CONFIG_FILE))
        if args.overrides:
            recipe = apply_overrides(recipe, args.overrides, source="command-line overrides")
        tcfg = cfg.get("tokenizer") or {"type": "byte"}
        tokenizer = load_tokenizer(ckpt_dir / "tokenizer.json" if tcfg.get("type") == "hf" else None)
    else:
        if args.recipe is None:
            raise UserError("RECIPE: missing (a recipe file or bundled name, e.g. `moe train mixtral`)")
        recipe = prepare_recipe(args.recipe, args.overrides)
        out = out or Path("runs") / recipe.name
        if (out / "checkpoint").exists() and not args.force:
            raise UserError(f"{out}: already holds a run; pass --resume to continue it or --force to start over")
        tokenizer = load_tokenizer(args.tokenizer)
        if tokenizer.vocab_size > recipe.model.vocab_size:
            recipe = apply_overrides(recipe, {"model.vocab_size": tokenizer.vocab_size}, source="tokenizer")
    t = recipe.train
    out.mkdir(parents=True, exist_ok=True)
    resume_state = json.loads((ckpt_dir / "train_state.json").read_text()) if args.resume else {}
    data = prepare_tokens(args.data, tokenizer, out / "data", t.val_fraction, t.seq_len, resume_state.get("data"))

    model = build_model(recipe)
    opt = make_optimizer(model, t)
    metrics_path = out / "metrics.jsonl"
    if args.resume:
        load_into(model, load_state_file(ckpt_dir / "model.safetensors"), ckpt_dir / "model.safetensors")
        ts = load_optimizer_state(opt, ckpt_dir)
        start_step, tokens_seen = ts["step"], ts["tokens_seen"]
        if ts.get("data") != data.fingerprint:
            raise UserError(f"{out}: the training data changed since the checkpoint; resume with the same DATA")
        _trim_metrics(metrics_path, start_step)
    elif metrics_path.exists():
        metrics_path.unlink()
    for g in opt.param_groups:  # resumed runs may extend max_steps / change lr
        g["betas"] = (t.beta1, t.beta2)

    val_starts = eval_windows(data.val, t.seq_len, t.eval_batches * t.batch_size)
    model.train()
    last_ckpt = find_resume_dir(out) if args.resume else None
    last_ckpt_step = start_step if args.resume else None
    summary = {"output": str(out), "recipe": recipe.name, "start_step": start_step, "steps": t.max_steps,
               "train_tokens": int(data.train.numel()), "val_tokens": int(data.val.numel())}
    val_loss = None
    step_times = []
    with open(metrics_path, "a") as mf:
        for step in range(start_step, t.max_steps):
            t0 = time.perf_counter()
            lr = lr_at(step, t)
            for g in opt.param_groups:
                g["lr"] = lr
            torch.manual_seed(t.seed * SEED_STRIDE + step)
            gen = torch.Generator().manual_seed(t.seed * SEED_STRIDE + step + 0x5EED)
            x, y = sample_batch(data.train, t.batch_size, t.seq_len, gen)
            res = model(x)
            ce = F.cross_entropy(res.logits_BSV.flatten(0, 1).float(), y.flatten())
            loss = ce + res.balance_loss
            if not torch.isfinite(loss):
                raise RunFailed(_nan_message(float(loss), step + 1, last_ckpt, last_ckpt_step))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip if t.grad_clip > 0 else float("inf"))
            if not torch.isfinite(gnorm):
                raise RunFailed(_nan_message(float(gnorm), step + 1, last_ckpt, last_ckpt_step, "gradient norm"))
            opt.step()
            loads = [moe.stats["load_E"] for _, moe in model.moe_layers]
            if recipe.balance.bias_update_rate > 0:
                model.update_router_biases(loads, recipe.balance.bias_update_rate)
            tokens_seen += x.numel()
            dt = time.perf_counter() - t0
            step_times.append(dt)
            rec = {"step": step + 1, "loss": float(ce.detach()), "total_loss": float(loss.detach()), "lr": lr,
                   "grad_norm": float(gnorm), "tokens_per_s": x.numel() / dt, "tokens_seen": tokens_seen}
            if res.aux:
                rec["aux"] = res.aux
            if loads:
                rec["max_vio"] = [round(max_vio(l), 4) for l in loads]
                dropped = sum(moe.stats["dropped"] for _, moe in model.moe_layers)
                rec["dropped_frac"] = dropped / max(1, sum(moe.stats["assignments"] for _, moe in model.moe_layers))
            done = step + 1 == t.max_steps
            if (step + 1) % t.eval_interval == 0 or done:
                val_loss, _ = evaluate_loss(model, data.val, t.seq_len, val_starts, t.batch_size)
                if not math.isfinite(val_loss):
                    raise RunFailed(_nan_message(val_loss, step + 1, last_ckpt, last_ckpt_step, "validation loss"))
                rec["val_loss"] = val_loss
            mf.write(json.dumps(rec) + "\n")
            mf.flush()
            if (step + 1) % t.ckpt_interval == 0 or done:
                last_ckpt = save_train_checkpoint(out, model, opt, step + 1, tokens_seen, tokenizer, data.fingerprint)
                last_ckpt_step = step + 1
                rec["checkpoint"] = str(last_ckpt)
            if progress:
                progress(rec, t.max_steps)
    measured = step_times[1:] or step_times
    summary.update({
        "final_step": t.max_steps, "tokens_seen": tokens_seen,
        "final_loss": rec["loss"] if step_times else None, "val_loss": val_loss,
        "tokens_per_s": (t.batch_size * t.seq_len * len(measured) / sum(measured)) if measured else None,
        "checkpoint": str(out / "checkpoint"), "metrics": str(metrics_path),
    })
    return summary


def _nan_message(value, step, last_ckpt, last_step, what="loss") -> str:
    kept = f"last good checkpoint: {last_ckpt} (step {last_step})" if last_ckpt else "no checkpoint was written yet"
    return f"{what} became {value} at step {step}; training stopped, nothing saved from this step; {kept}"
