"""bf16 on the CPU: padded expert rows, and `moe train --precision bf16-mixed` against fp32.

    python benchmarks/train_precision.py [--steps 12] [--rounds 2] [--quality-steps 300] [--data FILE]
                                         [--parts layer,train,quality]

Three parts, each measuring its baseline in this run:
1. layer: moecli's bf16 MoE layer (the moe_layer.py shapes), fwd+bwd, on a fresh input every call (new
   routing, new row counts per expert, as in training) and on one fixed input (moe_layer.py's way),
   with the expert rows padded (experts.PAD_ROWS, the default for 16-bit) and unpadded, alternating.
   Prints unpadded time over padded time (> 1: padding is faster).
2. train: tokens/s of `moe train` steps in fp32, in bf16-mixed, and in bf16-mixed with unpadded rows,
   for a few model sizes; each ratio is against fp32 in the same round (order rotated between rounds).
3. quality: validation loss after --quality-steps steps of the mixtral recipe, fp32 against bf16-mixed
   (same seed, data and steps); 0 skips it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from moe_layer import SHAPES, input_pool, make_case  # noqa: E402
from moecli.moe import experts as X
from moecli.training.setup import TrainArgs
from moecli.training.trainer import train

# recipe, overrides: the bundled small mixtral (d=128) up to d=512 with expert-size products
TRAIN_CASES = {
    "mixtral": ("mixtral", {}),
    "mixtral-d512": ("mixtral", {"model.d_model": 512, "moe.expert_ffn": 1024}),
    "qwen3-moe-d256": ("qwen3-moe", {"model.d_model": 256, "moe.expert_ffn": 512}),
}
MODES = {"fp32": ("fp32", None), "bf16-mixed": ("bf16-mixed", None), "bf16-mixed-unpadded": ("bf16-mixed", False)}


def layer_part(rounds: int, calls: int) -> dict:
    out = {}
    for sname, sh in SHAPES.items():
        x, g, layer, _ = make_case(sh, torch.bfloat16)
        fresh = input_pool(x, rounds * 2 * calls)
        ratios = {"fresh": [], "fixed": []}
        times = {}

        def call(xi):
            t0 = time.perf_counter()
            layer(xi).backward(g)
            return time.perf_counter() - t0

        for _ in range(2):  # warm-up: kernels for the fixed input's shapes, both ways
            for pad in (True, False):
                X.PAD_ROWS = pad
                call(x)
        for r in range(rounds):
            t = {}
            for pad in ((True, False) if r % 2 == 0 else (False, True)):
                X.PAD_ROWS = pad
                t["fixed", pad] = statistics.median(call(x) for _ in range(calls))
                t["fresh", pad] = statistics.median(call(fresh.pop()) for _ in range(calls))
            for kind in ratios:
                ratios[kind].append(t[kind, False] / t[kind, True])
                times.setdefault(kind, []).append({"padded_ms": t[kind, True] * 1e3,
                                                   "unpadded_ms": t[kind, False] * 1e3})
        X.PAD_ROWS = None
        out[sname] = {"shape": sh, "unpadded_over_padded": {k: {"median": statistics.median(v), "per_round": v}
                                                             for k, v in ratios.items()}, "times": times}
        print(f"layer bf16 {sname}: unpadded/padded fresh inputs {statistics.median(ratios['fresh']):.2f}, "
              f"fixed input {statistics.median(ratios['fixed']):.2f}", file=sys.stderr, flush=True)
    return out


def run_train(recipe: str, ov: dict, data: list[str], out: Path, mode: str) -> dict:
    precision, pad = MODES[mode]
    X.PAD_ROWS = pad
    try:
        return train(TrainArgs(recipe, data, out, ov | {"train.precision": precision}, force=True, quiet=True))
    finally:
        X.PAD_ROWS = None


def train_part(steps: int, rounds: int, data: list[str], tmp: Path) -> dict:
    out = {}
    modes = list(MODES)
    for case, (recipe, extra) in TRAIN_CASES.items():
        ov = extra | {"train.max_steps": steps, "train.eval_interval": steps, "train.ckpt_interval": steps,
                      "train.eval_batches": 1}
        tps = {m: [] for m in modes}
        ratios = {m: [] for m in modes[1:]}
        for r in range(rounds):
            order = modes[r % len(modes):] + modes[:r % len(modes)]
            got = {m: run_train(recipe, ov, data, tmp / case, m)["tokens_per_s"] for m in order}
            for m in modes:
                tps[m].append(got[m])
            for m in modes[1:]:
                ratios[m].append(got[m] / got["fp32"])
        out[case] = {"recipe": recipe, "overrides": extra, "steps": steps, "tokens_per_s": tps,
                     "speed_vs_fp32": {m: {"median": statistics.median(v), "per_round": v} for m, v in ratios.items()}}
        print(f"train {case}: tokens/s " + ", ".join(f"{m} {statistics.median(v):.0f}" for m, v in tps.items())
              + "; vs fp32 " + ", ".join(f"{m} {statistics.median(v):.2f}x" for m, v in ratios.items()),
              file=sys.stderr, flush=True)
    return out


def quality_part(steps: int, data: list[str], tmp: Path) -> dict:
    ov = {"train.max_steps": steps, "train.eval_interval": steps, "train.ckpt_interval": steps,
          "train.eval_batches": 16}
    res = {}
    for mode in ("fp32", "bf16-mixed"):
        s = run_train("mixtral", ov, data, tmp / f"q-{mode}", mode)
        res[mode] = {"val_loss": s["val_loss"], "final_loss": s["final_loss"], "tokens_per_s": s["tokens_per_s"]}
    res["val_loss_bf16_minus_fp32"] = res["bf16-mixed"]["val_loss"] - res["fp32"]["val_loss"]
    print(f"quality mixtral {steps} steps: val loss fp32 {res['fp32']['val_loss']:.4f}, "
          f"bf16-mixed {res['bf16-mixed']['val_loss']:.4f}", file=sys.stderr, flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12, help="training steps per timed run (the first is not timed)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--calls", type=int, default=7, help="layer calls per variant and round (median taken)")
    ap.add_argument("--quality-steps", type=int, default=300)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "austen.txt"),
                    help="training text (default: ../shared's Austen; the embedded corpus where it is missing)")
    ap.add_argument("--parts", default="layer,train,quality")
    a = ap.parse_args()
    data = [a.data] if Path(a.data).is_file() else []
    parts = set(a.parts.split(","))
    report = {"threads": torch.get_num_threads(), "torch": torch.__version__,
              "data": data[0] if data else "embedded default corpus"}
    with tempfile.TemporaryDirectory() as tmp:
        if "layer" in parts:
            report["layer"] = layer_part(a.rounds, a.calls)
        if "train" in parts:
            report["train"] = train_part(a.steps, a.rounds, data, Path(tmp))
        if "quality" in parts and a.quality_steps > 0:
            report["quality"] = quality_part(a.quality_steps, data, Path(tmp))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
