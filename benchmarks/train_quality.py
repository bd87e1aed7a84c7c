"""Mixtral-style MoE vs the dense recipe with equal active parameters, same data, steps and tokens.

    python benchmarks/train_quality.py [--steps 600] [--data ../shared/data/austen.txt]

Prints both validation losses, the MoE/dense tokens-per-second ratio (both runs
measured here, in this process, one after the other) and the targets:
MoE val loss below dense; MoE tokens/s >= 0.8x dense.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moecli.config import prepare_recipe
from moecli.model.params import parameter_report  # noqa: E402
from moecli.model.transformer import build_model  # noqa: E402
from moecli.training.setup import TrainArgs
from moecli.training.trainer import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "austen.txt"))
    ap.add_argument("--moe", default="mixtral")
    ap.add_argument("--dense", default="dense")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if not Path(a.data).is_file():
        sys.exit(f"error: {a.data}: not found (the benchmark needs the Austen corpus from ../shared/data)")
    ov = {"train.max_steps": a.steps, "train.eval_interval": a.steps, "train.ckpt_interval": a.steps,
          "train.eval_batches": 16, "train.seed": a.seed}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in (a.dense, a.moe):
            rep = parameter_report(build_model(prepare_recipe(name, ov)))
            print(f"training {name}: {rep['total']:,} total / {rep['active']:,} active params, {a.steps} steps",
                  file=sys.stderr)
            s = train(TrainArgs(name, [a.data], Path(tmp) / name, ov, quiet=True))
            results[name] = {"val_loss": s["val_loss"], "final_loss": s["final_loss"],
                             "tokens_per_s": s["tokens_per_s"], "total_params": rep["total"],
                             "active_params": rep["active"]}
    d, m = results[a.dense], results[a.moe]
    report = {
        "steps": a.steps, "threads": torch.get_num_threads(), "torch": torch.__version__, "results": results,
        "val_loss_moe_minus_dense": m["val_loss"] - d["val_loss"],
        "tokens_per_s_ratio_moe_over_dense": m["tokens_per_s"] / d["tokens_per_s"],
    }
    report["targets"] = {"moe_val_loss_below_dense": report["val_loss_moe_minus_dense"] < 0,
                         "tokens_per_s_ratio_at_least_0.8": report["tokens_per_s_ratio_moe_over_dense"] >= 0.8}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
