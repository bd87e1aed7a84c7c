"""Training at a real size: `moe train` against a transformers MixtralForCausalLM training loop, same weights,
same batch, same run.

    python benchmarks/train_real_shape.py [--steps 4] [--precisions fp32,bf16-mixed] [--rounds 1]
                                          [--work DIR] [--out benchmarks/results/train_real_shape.json]

The model: a 135M-parameter Llama's shape (d=576, 30 layers, FFN 1536, 9 heads / 3 KV heads, vocab 49152, tied)
with 8 experts top-2 in every layer, 692M parameters, built from random weights (no download) and saved once as a
moecli checkpoint and, exported, as a Mixtral directory. Then, in fresh processes, alternating:
* moecli: `moe train --init CKPT` on ../shared/data/austen.txt (byte tokens) at batch 4 x 256, the real command
  with its token cache, validation pass and final checkpoint (weights + optimizer: 8.3 GB written);
* transformers: MixtralForCausalLM.from_pretrained(the export) in float32, the same AdamW (fused), the same
  learning rate, clipping and aux-loss coefficient, the loss from its logits, windows of the same tokens; once as
  it comes and once with THP_MEM_ALLOC_ENABLE=1 (torch's huge-page switch, which `moe` sets for itself).
Per run: tokens/s over the steps after the first, peak RSS (VmHWM, from the OS) and the peak anonymous memory
(RssAnon sampled every 20 ms). moecli's memory estimate (moecli/train_memory.py) is printed beside its peak.
Before the runs, torch.mm's float32 peak on this machine: the best of square and the model's own product shapes;
the fp32 runs' model FLOP/s (6 x active matmul parameters + attention, per token) are given as a share of it.
bf16-mixed is skipped, with the reason recorded, where a bf16 product of the experts' shape runs under half as fast
as the fp32 one (a CPU without bf16 units, where a step takes minutes); --force-bf16 runs it anyway.

transformers is a test dependency only (pip install -e ".[test]"). Targets (issue 26): >= 1.5x transformers'
tokens/s, >= 70% of the mm peak in fp32, <= 0.8x its peak memory, peak <= 1.1 x moecli's estimate.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_common import emit  # noqa: E402
from moecli.training.memory import proc_status_bytes  # noqa: E402

SHAPE = {"model.d_model": 576, "model.n_layers": 30, "model.ffn_dim": 1536, "model.n_heads": 9,
         "model.n_kv_heads": 3, "model.vocab_size": 49152, "model.tie_embeddings": True, "model.context": 256,
         "moe.num_experts": 8, "moe.top_k": 2, "moe.expert_ffn": 1536, "balance.aux_loss_coef": 0.02}
BATCH, SEQ, LR = 4, 256, 1e-5
DATA = ROOT.parent / "shared" / "data" / "austen.txt"


class AnonPeak:
    """RssAnon sampled every 20 ms in a thread: the peak of the process's anonymous memory."""

    def __init__(self):
        self.peak = 0
        self.done = False
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while not self.done:
            self.peak = max(self.peak, proc_status_bytes("RssAnon"))
            time.sleep(0.02)


def recipe():
    from moecli.config import prepare_recipe

    return prepare_recipe("mixtral", SHAPE)


def mm_peak() -> dict:
    """torch.mm float32 GFLOP/s on square products and the model's (tokens x 576 x 1536, the head's)."""
    shapes = [(2048, 2048, 2048), (4096, 4096, 4096), (BATCH * SEQ, 576, 1536), (BATCH * SEQ * 2 // 8, 576, 1536),
              (BATCH * SEQ, 576, 49152)]
    out = {}
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        for _ in range(2):
            a @ b
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        out[f"{m}x{k}x{n}"] = 2 * m * k * n / statistics.median(times) / 1e9
    bf16 = {}
    m, k, n = BATCH * SEQ, 576, 1536  # the experts' and the dense FFN's product shape, in bf16
    a, b = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(k, n, dtype=torch.bfloat16)
    times = []
    for i in range(5):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    bf16[f"{m}x{k}x{n}"] = 2 * m * k * n / statistics.median(times[1:]) / 1e9
    return {"gflops": out, "peak_gflops": max(out.values()), "bf16_gflops": bf16,
            "bf16_over_fp32": bf16[f"{m}x{k}x{n}"] / out[f"{m}x{k}x{n}"]}


def flops_per_token(r) -> float:
    """Training FLOPs per token: 6 x the active parameters a token multiplies (the head included, the embedding's
    lookup not), plus attention's scores and weighted sum (2 x 2 x S x heads x head_dim per layer, x 3)."""
    from moecli.model.params import recipe_parameter_report

    rep = recipe_parameter_report(r)
    m = r.model
    matmul = rep["active"]  # the tied head's matrix is the embedding's: counted once, as the head
    attn = 3 * 4 * SEQ * m.n_heads * (m.head_dim or m.d_model // m.n_heads) * m.n_layers
    return 6 * matmul + attn


def prepare(work: Path) -> None:
    from moecli.formats.native import save_checkpoint
    from moecli.commands.export import export
    from moecli.model.transformer import build_model

    if (work / "hf" / "config.json").exists():
        return
    model = build_model(recipe(), seed=0)
    (work / "init").mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, work / "init")
    del model
    export(str(work / "init"), work / "hf", fmt="mixtral")


def child_moecli(work: Path, precision: str, steps: int) -> dict:
    from moecli.training.setup import TrainArgs
    from moecli.training.trainer import train
    from moecli.training.memory import training_memory

    anon = AnonPeak()
    ov = {"train.max_steps": steps, "train.batch_size": BATCH, "train.seq_len": SEQ, "train.lr": LR,
          "train.precision": precision, "train.eval_interval": 10**6, "train.eval_batches": 1,
          "train.ckpt_interval": 10**6, "train.warmup_steps": 0}
    res = train(TrainArgs(None, [str(DATA)], work / "run", ov, force=True, quiet=True, init=str(work / "init")))
    anon.done = True
    import dataclasses

    r = recipe()
    est = training_memory(dataclasses.replace(r, train=dataclasses.replace(
        r.train, batch_size=BATCH, seq_len=SEQ, precision=precision)))
    return {"tokens_per_s": res["tokens_per_s"], "final_loss": res["final_loss"],
            "peak_rss": proc_status_bytes("VmHWM"), "peak_anon": anon.peak, "estimate": est}


def child_transformers(work: Path, precision: str, steps: int) -> dict:
    import transformers
    from transformers import MixtralForCausalLM

    anon = AnonPeak()
    model = MixtralForCausalLM.from_pretrained(str(work / "hf"), dtype=torch.float32)
    model.config.output_router_logits = True
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.95), fused=True)
    tokens = torch.frombuffer(bytearray(DATA.read_bytes()), dtype=torch.uint8).long()
    g = torch.Generator().manual_seed(0)
    times, losses = [], []
    for _ in range(steps):
        starts = torch.randint(0, len(tokens) - SEQ - 1, (BATCH,), generator=g)
        w = torch.stack([tokens[s: s + SEQ + 1] for s in starts.tolist()])
        x, y = w[:, :-1], w[:, 1:]
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            out = model(input_ids=x)
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1).float(), y.flatten())
        total = loss + model.config.router_aux_loss_coef * out.aux_loss
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    anon.done = True
    return {"tokens_per_s": BATCH * SEQ * len(times[1:]) / sum(times[1:]), "final_loss": losses[-1],
            "peak_rss": proc_status_bytes("VmHWM"), "peak_anon": anon.peak, "transformers": transformers.__version__,
            "experts_implementation": getattr(model.config, "_experts_implementation", None)}


def run_child(kind: str, work: Path, precision: str, steps: int) -> dict:
    """One run in a fresh process. moecli's with THP_MEM_ALLOC_ENABLE=1, as the `moe` command sets it (moecli's
    __init__; this script imports torch first); transformers' as it comes, and ("transformers_thp") with the same
    setting, which any torch program can take."""
    cmd = [sys.executable, __file__, "--child", kind.split("_")[0], "--work", str(work), "--precisions", precision,
           "--steps", str(steps)]
    env = dict(os.environ)
    env.pop("THP_MEM_ALLOC_ENABLE", None)
    if kind in ("moecli", "transformers_thp"):
        env["THP_MEM_ALLOC_ENABLE"] = "1"
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        sys.exit(f"error: the {kind} run failed:\n{p.stderr[-3000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    print(f"{kind} {precision}: {res['tokens_per_s']:.1f} tokens/s, peak RSS {res['peak_rss'] / 2**30:.2f} GiB "
          f"(anon {res['peak_anon'] / 2**30:.2f})", file=sys.stderr, flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--precisions", default="fp32,bf16-mixed")
    ap.add_argument("--work", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--force-bf16", action="store_true",
                    help="run bf16-mixed even where this CPU's bf16 products are over 2x slower than fp32's")
    ap.add_argument("--child", choices=["moecli", "transformers"])
    a = ap.parse_args()
    if a.child:
        fn = child_moecli if a.child == "moecli" else child_transformers
        print(json.dumps(fn(a.work, a.precisions, a.steps)))
        return
    tmp = None if a.work else tempfile.TemporaryDirectory(prefix="train-real-shape-")
    work = a.work or Path(tmp.name)
    r = recipe()
    from moecli.model.params import param_counts

    total = param_counts(r)[0]
    print(f"building the {total / 1e6:.0f}M-parameter model in {work}", file=sys.stderr, flush=True)
    prepare(work)
    peak = mm_peak()
    fpt = flops_per_token(r)
    runs: dict = {}
    precisions, skipped = a.precisions.split(","), {}
    if "bf16-mixed" in precisions and peak["bf16_over_fp32"] < 0.5 and not a.force_bf16:
        # a CPU without bf16 units emulates them: a step takes minutes, and measures the emulation, not training
        skipped["bf16-mixed"] = (f"bf16 products run at {peak['bf16_over_fp32']:.2f}x fp32's here (no bf16 units); "
                                 "--force-bf16 runs it anyway")
        precisions.remove("bf16-mixed")
        print(f"bf16-mixed skipped: {skipped['bf16-mixed']}", file=sys.stderr, flush=True)
    for rnd in range(a.rounds):
        for precision in precisions:
            order = ("moecli", "transformers", "transformers_thp")
            order = order if rnd % 2 == 0 else order[::-1]
            for kind in order:
                runs.setdefault(precision, {}).setdefault(kind, []).append(run_child(kind, work, precision, a.steps))
    summary = {}
    for precision, by in runs.items():
        med = {k: {f: statistics.median(x[f] for x in v) for f in ("tokens_per_s", "peak_rss", "peak_anon")}
               for k, v in by.items()}
        ours, theirs, thp = med["moecli"], med["transformers"], med["transformers_thp"]
        est = by["moecli"][0]["estimate"]
        s = {"speedup": ours["tokens_per_s"] / theirs["tokens_per_s"],
             "speedup_vs_transformers_thp": ours["tokens_per_s"] / thp["tokens_per_s"],
             "peak_rss_ratio": ours["peak_rss"] / theirs["peak_rss"],
             "peak_rss_ratio_vs_transformers_thp": ours["peak_rss"] / thp["peak_rss"],
             "peak_anon_ratio": ours["peak_anon"] / theirs["peak_anon"],
             "moecli_peak_over_estimate": ours["peak_rss"] / est["peak"],
             "moecli_peak_over_states_and_saved_activations":
                 ours["peak_rss"] / (est["states"] + est["bf16_copies"] + est["saved_for_backward"]),
             "moecli_peak_over_states": ours["peak_rss"] / est["states"]}
        if precision == "fp32":
            for k, v in (("moecli", ours), ("transformers", theirs), ("transformers_thp", thp)):
                s[f"{k}_share_of_mm_peak"] = v["tokens_per_s"] * fpt / 1e9 / peak["peak_gflops"]
        summary[precision] = s
    emit({"params": total, "batch": [BATCH, SEQ], "steps": a.steps, "rounds": a.rounds, "flops_per_token": fpt,
          "mm": peak, "summary": summary, "skipped": skipped, "runs": runs, "torch": torch.__version__}, a.out)
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
