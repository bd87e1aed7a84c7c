"""``moe train``: the Trainer, whose ``run`` is the loop; each step's parts are its methods.

AdamW with warmup + a decay schedule (optim.py), balance losses, aux-free bias, checkpoints and exact resume
(state.py), signals and early stopping (signals.py), the metrics (metrics.py), validation (validation.py).

Determinism: every source of randomness in step s (the batch, router jitter and noise, random routing) is drawn
from generators seeded with (seed, s), so a run resumed from a checkpoint at step k replays steps k+1.. exactly as
an uninterrupted run does (on CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

from moecli.config import SEED_STRIDE
from moecli.data.tokens import eval_windows, sample_mixed
from moecli.errors import Interrupted, RunFailed, UserError
from moecli.formats.native import dtype_name, load_into, load_state_file
from moecli.model.transformer import autocast, build_model
from moecli.parallel.collectives import all_gather_int, all_mean, all_sum_, barrier
from moecli.parallel.data_parallel import replicate_model, shard_model, state_bytes
from moecli.parallel.device import resolve_device, return_freed_memory
from moecli.parallel.expert_parallel import scale_expert_gradients, shard_experts
from moecli.parallel.launch import current, init_from_env, launched_world, local_rank, local_world, spawn
from moecli.training.memory import current_rss, describe, lean_mode, peak_rss, training_memory
from moecli.training.metrics import RoutingWindow, add_routing_health, routing_record, routing_summary
from moecli.training.optim import KeptGradients, clip_gradients, create_optimizer_state, lr_at, make_optimizer
from moecli.training.setup import TrainArgs, check_batch_split, run_tokens, setup, train_layout
from moecli.model.lora import ADAPTER_FILE, add_lora, load_adapters
from moecli.fileio import output_lock
from moecli.training import esft
from moecli.training.signals import EarlyStop, StopSignals
from moecli.training.state import (best_val_loss, lora_extra, load_optimizer_state, save_best, save_train_checkpoint,
                                   trim_metrics)
from moecli.training.validation import validate


@contextlib.contextmanager
def made_for_the_run(out: Path | None):
    """Make the run directory (None: another rank makes it); if it was not there before and what follows fails (a
    missing data file, a bad tokenizer), remove it again: a failed start leaves nothing behind."""
    if out is None:
        yield
        return
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        if made:
            shutil.rmtree(out, ignore_errors=True)
        raise


def train(args: TrainArgs) -> dict:
    """Run training; returns a summary dict. Under --nproc this process tokenises the data once and starts the
    ranks; under torchrun each process is a rank."""
    if launched_world() > 1 and not current().world > 1:  # started by torchrun
        return rank_main(args)
    if args.nproc > 1 and not current().world > 1:
        st = setup(args)  # validate and tokenise once, here, before starting the ranks
        with output_lock(st.out):  # held while the ranks run (they take none of their own)
            with made_for_the_run(st.out):
                data = run_tokens(args, st)
            rank_args = dataclasses.replace(args, data=[], val_data=[], data_fingerprint=data.fingerprint,
                                            output=st.out, recipe=st.recipe if args.recipe is not None else None,
                                            # chosen once, here: the ranks take the list
                                            train_experts=(esft.to_spec(st.train_experts) if st.train_experts
                                                           else args.train_experts))
            return spawn(args.nproc, rank_main, rank_args)
    return _run(args, is_main=True)


def rank_main(args: TrainArgs) -> dict:
    """One rank of a multi-process run: join the process group, then train."""
    info = init_from_env(args.expert_parallel, args.fsdp, cuda=resolve_device(args.device).type == "cuda")
    return _run(args, is_main=info.is_main)


def _run(args: TrainArgs, is_main: bool) -> dict:
    if args.progress is None:
        return Trainer(args).run()
    with args.progress(enabled=is_main and not args.quiet) as shown:
        return Trainer(args, shown.update).run()


class Trainer:
    """One run. ``prepare`` settles the run (setup, data, model, optimizer, resumed state); ``run`` is the loop;
    ``train_step``, ``evaluate`` and ``checkpoint`` are its parts; ``summary`` is what it returns."""

    def __init__(self, args: TrainArgs, progress=None):
        self.args, self.progress, self.info = args, progress, current()

    # ---------------------------------------------------------------- the loop

    def run(self) -> dict:
        with contextlib.ExitStack() as self.held:  # the output's lock (prepare takes it), let go when the run ends
            return self.loop()

    def loop(self) -> dict:
        self.prepare()
        t, info = self.t, self.info
        signals = StopSignals()
        signals.install()
        metrics = open(self.out / "metrics.jsonl", "a") if info.is_main else None
        try:
            for step in range(self.start_step, t.max_steps):
                rec = self.train_step(step)
                done = step + 1 == t.max_steps
                if (step + 1) % t.eval_interval == 0 or done:
                    done = self.evaluate(step + 1, rec, done)
                if metrics:
                    metrics.write(json.dumps(rec) + "\n")
                    metrics.flush()
                interrupted = signals.asked(info) and not done  # Ctrl-C or SIGTERM: keep this step, then end
                if (step + 1) % t.ckpt_interval == 0 or done or interrupted:
                    self.checkpoint(step + 1, rec)
                if self.progress and info.is_main:
                    self.progress(rec, t.max_steps)
                if self.stopped:
                    break
                if interrupted:
                    raise Interrupted(f"stopped after step {step + 1} of {t.max_steps}, saved in {self.last_ckpt}; "
                                      f"continue with: moe train -o {self.out} --resume", signals.agreed)
        finally:
            signals.restore()
            if metrics:
                metrics.close()
        return self.summary()

    # ---------------------------------------------------------------- one step

    def train_step(self, step: int) -> dict:
        """Step ``step`` (0-based): this rank's share of the batch forward and backward, the update, the record."""
        t, info, model = self.t, self.info, self.model
        t0 = time.perf_counter()
        lr = lr_at(step, t)
        for g in self.opt.param_groups:
            g["lr"] = lr
        x, y = self.batch(step)
        if self.kept is not None:
            self.kept.zero()
        else:
            self.opt.zero_grad(set_to_none=True)
        m = micro_steps(model, x, y, t.grad_accum, t.precision)
        ce_all, loss_all = all_mean(m["ce"]), all_mean(m["loss"])
        if not math.isfinite(loss_all):
            raise RunFailed(self.nan_message(loss_all, step + 1))
        gnorm = self.update(step)
        loads = [all_sum_(load) for load in m["loads"]]
        if self.recipe.balance.bias_update_rate > 0:
            model.update_router_biases(loads, self.recipe.balance.bias_update_rate)
        self.tokens_seen += x.numel() * info.world
        dt = time.perf_counter() - t0
        self.step_times.append(dt)
        rec = {"step": step + 1, "loss": ce_all, "total_loss": loss_all, "lr": lr, "grad_norm": float(gnorm),
               "tokens_per_s": x.numel() * info.world / dt, "tokens_seen": self.tokens_seen}
        if m["aux"]:
            rec["aux"] = {k: all_mean(v) for k, v in m["aux"].items()}
        self.window.add(loads)
        add_routing_health(rec, m, loads, self.window.layers)
        self.last_rec = rec
        return rec

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Step ``step``'s global batch, drawn from its own seed, and this rank's rows of it (on the device)."""
        t = self.t
        torch.manual_seed(t.seed * SEED_STRIDE + step)
        gen = torch.Generator().manual_seed(t.seed * SEED_STRIDE + step + 0x5EED)
        x, y = sample_mixed(self.data.train, self.data.weights, t.batch_size, t.seq_len, gen)
        return x[self.rows].to(self.device), y[self.rows].to(self.device)

    def update(self, step: int) -> torch.Tensor:
        """Step ``step``'s gradients made ready (unreached ones dropped, expert-parallel ones scaled), clipped,
        then AdamW's step; returns the gradient norm before clipping."""
        if self.kept is not None and self.info.world == 1:  # (several processes: DDP reduces every gradient)
            self.kept.drop_unreached()
        scale_expert_gradients(self.model, self.info)
        gnorm = clip_gradients(self.model, self.info, self.t.grad_clip)
        if not torch.isfinite(gnorm):
            raise RunFailed(self.nan_message(float(gnorm), step + 1, "gradient norm"))
        self.opt.step()
        return gnorm

    def evaluate(self, step: int, rec: dict, done: bool) -> bool:
        """The validation pass after step ``step`` (1-based): val loss into ``rec``, early stopping, OUT/best, the
        routing window; returns whether the run is done."""
        t, info = self.t, self.info
        self.val_loss, self.val_by_source = validate(self.model, self.data, t, self.val_starts)
        if not math.isfinite(self.val_loss):
            raise RunFailed(self.nan_message(self.val_loss, step, "validation loss"))
        rec["val_loss"] = self.val_loss
        if self.val_by_source:
            rec["val_loss_by_source"] = self.val_by_source
        if self.early.update(self.val_loss, step) and not done:
            done = self.stopped = True
            rec["early_stop"] = self.early.state()
        if t.keep_best and self.val_loss < self.best:
            self.best = self.val_loss
            save_best(self.out, self.model, self.tokenizer, info, {
                "step": step, "tokens_seen": self.tokens_seen, "val_loss": self.val_loss,
                "data": self.data.fingerprint, **lora_extra(self.st.lora, self.st.base_dtype)})
            rec["best"] = True
        if self.window.layers:  # the routing since the last validation pass
            self.routing = self.window.report()
            rec["routing"] = routing_record(self.routing)
        return done

    def checkpoint(self, step: int, rec: dict) -> None:
        """OUT/checkpoint after step ``step`` (1-based)."""
        data = self.data
        self.last_ckpt = save_train_checkpoint(self.out, self.model, self.opt, self.tokenizer, self.info, {
            "step": step, "tokens_seen": self.tokens_seen, "data": data.fingerprint, "early_stop": self.early.state(),
            "data_weights": data.weights if data.sources else None, "train_experts": self.st.train_experts,
            "lora": self.st.lora, "base_dtype": self.st.base_dtype})
        self.last_ckpt_step = step
        rec["checkpoint"] = str(self.last_ckpt)

    def nan_message(self, value, step: int, what: str = "loss") -> str:
        kept = (f"last good checkpoint: {self.last_ckpt} (step {self.last_ckpt_step})" if self.last_ckpt else
                "no checkpoint was written yet")
        return f"{what} became {value} at step {step}; training stopped, nothing saved from this step; {kept}"

    # ---------------------------------------------------------------- before the loop

    def prepare(self) -> None:
        """Everything the loop needs, in the order that keeps memory low: the checks, the data, the model on its
        device and spread over the ranks, the optimizer and its state (resumed, or made before the first step)."""
        args, info = self.args, self.info
        st = self.st = setup(args)
        if info.is_main and args.data_fingerprint is None:  # --nproc's launcher holds it for its ranks
            self.held.enter_context(output_lock(st.out))
        self.recipe, self.out, self.tokenizer, self.t = st.recipe, st.out, st.tokenizer, st.recipe.train
        t = self.t
        self.memory = training_memory(self.recipe, train_layout(args, st))
        self.lean = lean_mode(self.memory, st.device, local_world(info.world))
        if self.lean:  # large freed tensors back to the system at once, gradients freed each step (device.py)
            return_freed_memory()
        check_batch_split(t.batch_size, info.world, t.grad_accum)
        with made_for_the_run(self.out if info.is_main else None):
            self.data = self.load_data()
        self.rss_at_start = current_rss()  # before the model: what the estimate adds to
        if info.is_main and not args.quiet:
            lean_note = ("; close to the memory available, so gradients are freed each step (lower peak, slower)"
                         if self.lean else "")
            print(f"memory: about {describe(self.memory)}{lean_note}", file=sys.stderr, flush=True)
            if st.train_experts is not None:
                print(f"training only these experts (--train-experts): "
                      f"{esft.describe(st.train_experts, self.recipe.moe.num_experts)}", file=sys.stderr, flush=True)
        self.model = self.place_model()
        self.opt = make_optimizer(self.model, t)
        self.resume_or_start()
        self.notes = self.resume_notes()
        if info.is_main and not args.quiet:
            for note in self.notes:
                print(f"note: {note}", file=sys.stderr, flush=True)
        for g in self.opt.param_groups:  # resumed runs may extend max_steps / change lr
            g["betas"] = (t.beta1, t.beta2)
        self.kept = None if self.lean or (info.fsdp and info.world > 1) else KeptGradients(self.model)
        if self.kept is not None and not self.opt.state:
            create_optimizer_state(self.opt, self.kept)
        barrier()
        # each validation stream (one, or with --data-weights each source's tail) gets its share of the windows
        self.val_starts = [eval_windows(v, t.seq_len, max(1, t.eval_batches * t.batch_size // len(self.data.val)))
                           for v in self.data.val]
        self.model.train()
        local_b = t.batch_size // info.world
        self.rows = slice(info.rank * local_b, (info.rank + 1) * local_b)
        self.val_loss, self.val_by_source, self.stopped, self.routing, self.last_rec = None, None, False, None, None
        self.best = best_val_loss(self.out) if t.keep_best else math.inf  # resumed: the best of the steps before
        self.step_times: list[float] = []
        self.window = RoutingWindow(self.model)

    def load_data(self):
        """The run's tokens; under torchrun (no launcher tokenised them) rank 0 fills the cache first."""
        if self.info.world > 1 and self.args.data_fingerprint is None:
            if self.info.is_main:
                run_tokens(self.args, self.st)
            barrier()
        return run_tokens(self.args, self.st)

    def place_model(self):
        """The model built, its starting weights loaded, on this rank's device, spread over the ranks."""
        st, info = self.st, self.info
        model = build_model(self.recipe)
        if st.init_dir is not None:  # weights only: a new run (fresh optimizer, step 0)
            load_into(model, st.init_state, st.init_dir)
            st.init_state = None  # copied: its file's mapped pages (counted in RSS) go
        if self.args.resume and st.lora is None:
            load_into(model, load_state_file(st.ckpt_dir / "model.safetensors"), st.ckpt_dir / "model.safetensors")
        if st.lora is not None:  # --lora: adapters on the frozen base (held in --base-dtype)
            add_lora(model, st.lora, self.t.seed)
            for p in model.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(st.base_dtype)
            if self.args.resume:
                load_adapters(model, load_state_file(st.ckpt_dir / ADAPTER_FILE), st.ckpt_dir / ADAPTER_FILE)
        if st.train_experts is not None:  # --train-experts: the rest frozen, before the optimizer sees it
            esft.train_only(model, st.train_experts)
        device = st.device
        if device.type == "cuda" and info.world > 1:  # this rank's own GPU
            device = torch.device("cuda", local_rank())
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
        self.device = device
        return model

    def resume_notes(self) -> list[str]:
        """What a --resume changes or leaves to do, said: nothing left to train; a learning-rate schedule that the
        new train.max_steps (or lr, warmup, schedule) makes differ from the one the run started on."""
        old, t, s = self.st.resumed_train, self.t, self.start_step
        if old is None:
            return []
        notes = []
        if s >= t.max_steps:
            notes.append(f"the checkpoint is at step {s}, train.max_steps is {t.max_steps}: nothing to train (give "
                         f"--max-steps above {s} to continue)")
        elif any(getattr(old, k) != getattr(t, k) for k in ("max_steps", "lr", "warmup_steps", "lr_schedule",
                                                             "min_lr_ratio", "decay_fraction")):
            last, now = lr_at(max(0, s - 1), old), lr_at(s, t)
            notes.append(f"the learning-rate schedule is recomputed: {t.lr_schedule} over {t.max_steps} steps, lr "
                         f"{t.lr:g} (the run so far: {old.lr_schedule} over {old.max_steps} steps, lr {old.lr:g}); step "
                         f"{s} trained at lr {last:.3g}, step {s + 1} trains at {now:.3g}")
        return notes

    def resume_or_start(self) -> None:
        """A resumed run's optimizer state, step, tokens seen and early-stopping count (its metrics cut back to the
        checkpoint); a new run's: nothing of an earlier run's metrics or best model stays (--force)."""
        st, t, info = self.st, self.t, self.info
        metrics_path = self.out / "metrics.jsonl"
        self.start_step, self.tokens_seen, self.early = 0, 0, EarlyStop(t.patience)
        self.last_ckpt, self.last_ckpt_step = None, None
        if self.args.resume:
            ts = st.resume_state
            load_optimizer_state(self.model, self.opt, st.ckpt_dir, ts, info)
            self.start_step, self.tokens_seen = ts["step"], ts["tokens_seen"]
            self.early = EarlyStop.resumed(t.patience, ts)
            if self.start_step > t.max_steps:  # before anything of the run is touched
                raise UserError(f"train.max_steps ({t.max_steps}): the checkpoint in {self.out} is already at step "
                                f"{self.start_step}; give more steps to continue it")
            self.last_ckpt, self.last_ckpt_step = st.ckpt_dir, self.start_step
            if info.is_main:
                trim_metrics(metrics_path, self.start_step)
        elif info.is_main:
            if metrics_path.exists():
                metrics_path.unlink()
            if (self.out / "best").exists():
                shutil.rmtree(self.out / "best")

    # ---------------------------------------------------------------- after the loop

    def summary(self) -> dict:
        t, info, data, st = self.t, self.info, self.data, self.st
        measured = self.step_times[1:] or self.step_times
        rec = self.last_rec
        return {
            "output": str(self.out), "recipe": self.recipe.name, "start_step": self.start_step, "steps": t.max_steps,
            "train_tokens": data.n_train, "val_tokens": data.n_val,
            "val_from": "--val-data" if data.val_from_own_text else
            f"the last {t.val_fraction:g} of the tokens" + (" of each source" if data.sources else ""),
            "data_mix": [{"source": src, "weight": w, "train_tokens": tr.numel(),
                          "val_tokens": None if data.val_from_own_text else data.val[i].numel()}
                         for i, (src, w, tr) in enumerate(zip(data.sources, data.weights, data.train))] or None,
            "processes": info.world, "expert_parallel": info.expert_parallel, "fsdp": info.fsdp,
            "precision": t.precision,
            "device": str(self.device),
            "memory_estimate": {k: self.memory[k] for k in ("peak", "states", "bf16_copies", "activations",
                                                            "saved_for_backward")},
            "low_memory_mode": self.lean,
            "init": str(st.init_dir) if st.init_dir is not None else None,
            "finetune_defaults": {k.split(".", 1)[1]: v for k, v in st.finetune.items()} if st.finetune else None,
            "train_experts": ({str(i): v for i, v in st.train_experts.items()}
                              if st.train_experts is not None else None),
            "trainable_parameters": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
            "lora": ({**st.lora.to_dict(), "base_dtype": dtype_name(st.base_dtype)} if st.lora is not None
                     else None),
            "final_step": rec["step"] if self.stopped else t.max_steps, "tokens_seen": self.tokens_seen,
            # passes' worth of the training tokens seen (--epochs): windows are drawn at random
            "epochs": self.tokens_seen / max(1, data.n_train),
            "stopped_early": rec["early_stop"] if self.stopped else None,
            "final_loss": rec["loss"] if self.step_times else None, "val_loss": self.val_loss,
            "val_loss_by_source": self.val_by_source,
            "tokens_per_s": (t.batch_size * t.seq_len * len(measured) / sum(measured)) if measured else None,
            "checkpoint": str(self.out / "checkpoint"), "metrics": str(self.out / "metrics.jsonl"),
            "peak_rss": peak_rss(), "rss_at_start": self.rss_at_start,  # this process's (rank 0's), from the OS
            # weights, gradients and AdamW state each rank holds at the end (its shards under --fsdp), measured
            "state_bytes_per_rank": all_gather_int(state_bytes(self.model, self.opt)),
            "best": ({"checkpoint": str(self.out / "best"), "val_loss": self.best}
                     if t.keep_best and math.isfinite(self.best) else None),
            "routing": routing_summary(self.routing),
            "notes": self.notes or None,
            "nothing_trained": self.start_step >= t.max_steps,
        }


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
            res = model(x, targets_BS=y)  # the loss in chunks of tokens, without the batch's logits (model/loss.py)
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
