"""Expert pruning and expert-specialised fine-tuning on a moecli MoE trained here until its experts specialise.

    python benchmarks/prune.py [--steps 400] [--out benchmarks/results/prune.json]

1. Train a 32-expert top-8 MoE (byte-level, 4 layers) on a mix of prose (../shared/data/austen.txt) and code (the
   Python standard library's source, moecli's default corpus), in chunks that alternate.
2. Prune it by 25% and 50% with each method (reap, ean, frequency, random over --random-seeds seeds), calibrated on
   a mixed text the training never saw; report the held-out loss increase of each (prose and code held out apart).
3. Time the calibration pass against one moe eval pass over the same windows (goal <= 1.2x; alternating repeats in
   this process) and read the peak memory of `moe prune` and `moe eval` over that text from the OS (wait4).
4. ESFT against a full fine-tune on one domain (code), the same steps and lr: the code loss gained, the prose loss
   kept, trainable parameters, peak memory of each run (wait4).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moecli.commands.evaluate import evaluate  # noqa: E402
from moecli.commands.prune import PruneOptions, calibrate, prune  # noqa: E402
from moecli.data.corpus import default_corpus_files  # noqa: E402
from moecli.data.tokens import eval_windows  # noqa: E402
from moecli.formats.checkpoint import open_checkpoint  # noqa: E402
from moecli.training.setup import TrainArgs  # noqa: E402
from moecli.training.trainer import train  # noqa: E402
from moecli.training.validation import evaluate_loss  # noqa: E402

RECIPE = {"model.n_layers": 4, "model.d_model": 128, "model.n_heads": 4, "model.n_kv_heads": 2,
          "model.context": 256, "moe.num_experts": 32, "moe.top_k": 8, "moe.expert_ffn": 96,
          "train.batch_size": 16, "train.seq_len": 128, "train.lr": 3e-3, "train.warmup_steps": 20}
CHUNK = 2048  # bytes of one source before the other's turn


def texts(tmp: Path, austen: Path) -> dict[str, Path]:
    """train.txt (prose and code chunks alternating), calib.txt (the same, from text the training did not see),
    each domain's held-out text alone (prose.txt, code.txt), and code to fine-tune on (code_ft.txt: held out from
    the rest)."""
    prose = austen.read_text(encoding="utf-8")
    code = "".join(p.read_text(encoding="utf-8", errors="replace") for p in default_corpus_files(6 * 2**20))
    n = min(len(prose), len(code))
    cut_train, cut_cal = int(n * 0.8), int(n * 0.9)

    def mix(a: str, b: str) -> str:
        return "".join(a[i: i + CHUNK] + b[i: i + CHUNK] for i in range(0, min(len(a), len(b)), CHUNK))

    out = {"train": mix(prose[:cut_train], code[:cut_train]), "calib": mix(prose[cut_train:cut_cal],
                                                                           code[cut_train:cut_cal]),
           "prose": prose[cut_cal:n][: 2**17], "code": code[cut_cal:n][: 2**17], "code_ft": code[cut_cal:n][2**17:]}
    paths = {}
    for k, v in out.items():
        paths[k] = tmp / f"{k}.txt"
        paths[k].write_text(v, encoding="utf-8")
    return paths


def peak_of(cmd: list[str]) -> tuple[float, int]:
    """(seconds, peak RSS in bytes) of a command run to its end: its VmHWM (the high-water mark of its own memory
    since its exec) read from /proc every 20 ms while it runs. wait4's ru_maxrss would also count this process's
    memory at the fork, which here holds models."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as errors:
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errors)
        hwm = 0
        while p.poll() is None:
            try:
                for line in open(f"/proc/{p.pid}/status"):
                    if line.startswith("VmHWM:"):
                        hwm = max(hwm, int(line.split()[1]) * 1024)
            except (OSError, ValueError):
                pass
            time.sleep(0.02)
        if p.returncode != 0:
            errors.seek(0)
            raise SystemExit(f"{' '.join(cmd)} failed: {errors.read().decode()[-2000:]}")
    return time.perf_counter() - t0, hwm


def loss_on(ckpt: Path, text: Path) -> float:
    return evaluate(str(ckpt), [str(text)], 128, 16, 64)["loss"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--finetune-steps", type=int, default=60)
    ap.add_argument("--random-seeds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=65536)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "austen.txt"))
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if not Path(a.data).is_file():
        sys.exit(f"error: {a.data}: not found (the benchmark needs the Austen corpus from ../shared/data)")
    report: dict = {"threads": torch.get_num_threads(), "torch": torch.__version__, "recipe": RECIPE,
                    "steps": a.steps}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        t = texts(tmp, Path(a.data))
        t0 = time.perf_counter()
        s = train(TrainArgs("mixtral", [str(t["train"])], tmp / "base",
                            {**RECIPE, "train.max_steps": a.steps, "train.eval_interval": a.steps,
                             "train.ckpt_interval": a.steps}, quiet=True))
        base = tmp / "base" / "checkpoint"
        report["base"] = {"val_loss": s["val_loss"], "train_seconds": time.perf_counter() - t0,
                          "prose_loss": loss_on(base, t["prose"]), "code_loss": loss_on(base, t["code"])}
        print(f"base: {report['base']}", file=sys.stderr)

        # 2. each method at 25% and 50%: one calibration pass, its scores reused
        first = prune(str(base), [str(t["calib"])], tmp / "reap-50",
                      PruneOptions(ratio=0.5, max_tokens=a.max_tokens, seq_len=128))
        scores = str(tmp / "reap-50" / "prune_scores.json")
        rows = []
        for ratio in (0.25, 0.5):
            for method in ("reap", "ean", "frequency", "random"):
                seeds = range(a.random_seeds) if method == "random" else [0]
                runs = []
                for seed in seeds:
                    out = tmp / f"{method}-{ratio}-{seed}"
                    res = prune(str(base), [str(t["calib"])], out,
                                PruneOptions(ratio=ratio, method=method, seed=seed, max_tokens=a.max_tokens,
                                             seq_len=128, scores=scores))
                    runs.append({"seed": seed, "heldout_increase": res["loss_increase"],
                                 "prose_increase": loss_on(out, t["prose"]) - report["base"]["prose_loss"],
                                 "code_increase": loss_on(out, t["code"]) - report["base"]["code_loss"]})
                row = {"ratio": ratio, "method": method, "keep": res["keep"], "runs": runs,
                       **{k: statistics.mean(r[k] for r in runs) for k in ("heldout_increase", "prose_increase",
                                                                        "code_increase")}}
                rows.append(row)
                print(f"{ratio:.2f} {method:9s} held-out +{row['heldout_increase']:.4f}  prose "
                      f"+{row['prose_increase']:.4f}  code +{row['code_increase']:.4f}", file=sys.stderr)
        report["pruning"] = rows
        report["loss_before_heldout"] = first["loss_before"]

        # 3. the calibration pass against one eval pass over the same windows, alternating
        ckpt = open_checkpoint(base)
        model, tok = ckpt.model_and_tokenizer(torch.float32)
        ids = torch.tensor(tok.encode(t["calib"].read_text())[: a.max_tokens])
        times = {"calibration": [], "eval": []}
        for r in range(a.repeats + 1):
            order = [("calibration", lambda: calibrate(model, False, ids, 128, 8, tmp)),
                     ("eval", lambda: evaluate_loss(model, ids, 128, eval_windows(ids, 128), 8))]
            for name, fn in order if r % 2 == 0 else order[::-1]:
                t1 = time.perf_counter()
                fn()
                if r:  # the first round warms up
                    times[name].append(time.perf_counter() - t1)
        cal, ev = statistics.median(times["calibration"]), statistics.median(times["eval"])
        moe = [sys.executable, "-m", "moecli.cli"]
        _, prune_peak = peak_of(moe + ["prune", str(base), str(t["calib"]), "-o", str(tmp / "peak"), "--ratio", "0.5",
                                       "--holdout", "0", "--seq-len", "128", "--max-tokens", str(a.max_tokens)])
        _, eval_peak = peak_of(moe + ["eval", str(base), str(t["calib"]), "--seq-len", "128"])
        report["calibration"] = {"tokens": int(ids.numel() // 128 * 128), "seconds_median": cal,
                                 "eval_seconds_median": ev, "ratio_to_eval": cal / ev, "goal_ratio_at_most": 1.2,
                                 "prune_peak_rss": prune_peak, "eval_peak_rss": eval_peak}
        print(f"calibration {cal:.2f} s vs eval {ev:.2f} s: {cal / ev:.2f}x; peak RSS prune "
              f"{prune_peak / 2**20:.0f} MiB, eval {eval_peak / 2**20:.0f} MiB", file=sys.stderr)

        # 4. ESFT against a full fine-tune on code
        ft = {}
        for name, extra in (("full", []), ("esft", ["--train-experts", "top-p:0.2"])):
            out = tmp / f"ft-{name}"
            secs, peak = peak_of(moe + ["train", "--init", str(base), str(t["code_ft"]), "-o", str(out), "-q",
                                        "--max-steps", str(a.finetune_steps), "--lr", "1e-3",
                                        "--eval-interval", str(a.finetune_steps), *extra])
            summary = json.loads((out / "checkpoint" / "config.json").read_text())
            n_train = sum(p.numel() for p in open_checkpoint(out).load_model().parameters())
            if name == "esft":
                chosen = summary["train_experts"]
                per_expert = 3 * RECIPE["model.d_model"] * RECIPE["moe.expert_ffn"]
                n_train = per_expert * sum(len(v) for v in chosen.values())
            ft[name] = {"seconds": secs, "peak_rss": peak, "trainable_parameters": n_train,
                        "code_loss": loss_on(out / "checkpoint", t["code"]),
                        "prose_loss": loss_on(out / "checkpoint", t["prose"])}
            ft[name]["code_gain"] = report["base"]["code_loss"] - ft[name]["code_loss"]
            ft[name]["prose_change"] = ft[name]["prose_loss"] - report["base"]["prose_loss"]
            if name == "esft":
                ft[name]["experts_per_layer"] = {k: len(v) for k, v in chosen.items()}
            print(f"fine-tune {name}: {ft[name]}", file=sys.stderr)
        report["finetune"] = {"steps": a.finetune_steps, "lr": 1e-3,
                              "data": "code_ft (held out from the base's training), scored on code.txt", **ft}
    text = json.dumps(report, indent=2)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
