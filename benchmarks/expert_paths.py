"""Which CPU expert path is faster, per layer shape: moecli's threaded path or the per-expert loop.

    python benchmarks/expert_paths.py [--dtypes fp32,bf16] [--repeats 7] [--rounds 3] [--no-page-faults]

For each shape and dtype, moecli's MoE layer is timed with the threaded path forced on and forced off
(moecli/experts.py: THREADED, the same switch as MOECLI_EXPERT_THREADS=on|off), fwd+bwd and forward
alone (no grad), alternating the two paths round by round in one process. Printed: loop time /
threaded time per round (> 1: the threaded path is faster) and their median, with the shape's work
(rows x D x F of one expert product, summed over experts), which experts.use_threads compares with
MIN_THREADED_WORK (and, in fp32, with FP32_MIN_THREADED_WORK, besides the number of experts), and the
path that auto mode takes for each. The shapes straddle those thresholds.
--no-page-faults re-runs this script with glibc told to keep freed memory (moe_layer.NO_PAGE_FAULTS_ENV).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from moe_layer import DTYPES, NO_PAGE_FAULTS_ENV, fwd_bwd, make_case, timeit  # noqa: E402

from moecli.moe import experts as X
from moecli.moe.layer import MoELayer  # noqa: E402

# (tokens, d_model, expert FFN, experts, top-k): moe_layer.py's two shapes, then others around them
SHAPES = [(4096, 512, 1024, 8, 2), (4096, 256, 512, 64, 8), (4096, 1024, 2048, 8, 2), (4096, 512, 1024, 32, 4),
          (8192, 512, 1024, 8, 2), (2048, 512, 1024, 8, 2), (4096, 256, 1024, 64, 6), (4096, 256, 512, 16, 2),
          (4096, 128, 256, 128, 8), (2048, 128, 512, 8, 2)]


def auto_path(layer: MoELayer, x: torch.Tensor, grad: bool) -> str:
    """The path auto mode (THREADED = None) takes for this layer and input, with or without autograd."""
    saved, X.THREADED = X.THREADED, None
    try:
        with torch.set_grad_enabled(grad):
            layer(x)
        return layer.experts.last_path
    finally:
        X.THREADED = saved


def compare(T: int, D: int, F: int, E: int, K: int, dtype: torch.dtype, repeats: int, rounds: int) -> dict:
    x, g, layer, _ = make_case(dict(T=T, D=D, F=F, E=E, K=K), dtype)
    fwd, both = fwd_bwd(layer, x, g)
    out = {"shape": dict(T=T, D=D, F=F, E=E, K=K), "work": T * K * D * F,
           "auto_path_fwd_bwd": auto_path(layer, x, True), "auto_path_fwd": auto_path(layer, x, False)}
    saved = X.THREADED
    try:
        for name, fn in (("fwd_bwd", both), ("fwd", fwd)):
            ratios = []
            for r in range(rounds):
                times = {}
                for mode in ((False, True) if r % 2 == 0 else (True, False)):
                    X.THREADED = mode
                    times[mode] = timeit(fn, repeats)
                ratios.append(times[False] / times[True])
            out[f"loop_over_threaded_{name}"] = {"median": statistics.median(ratios), "per_round": ratios}
    finally:
        X.THREADED = saved
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--repeats", type=int, default=7, help="timed calls per path and round (median taken)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-page-faults", action="store_true")
    a = ap.parse_args()
    if a.no_page_faults and os.environ.get("GLIBC_TUNABLES") != NO_PAGE_FAULTS_ENV["GLIBC_TUNABLES"]:
        os.execve(sys.executable, [sys.executable, *sys.argv], os.environ | NO_PAGE_FAULTS_ENV)
    if torch.get_num_threads() < 2:
        raise SystemExit("the threaded path needs at least 2 intra-op threads (torch.get_num_threads())")
    report = {"threads": torch.get_num_threads(), "torch": torch.__version__, "no_page_faults": a.no_page_faults,
              "min_threaded_work": X.MIN_THREADED_WORK, "fp32_min_threaded_work": X.FP32_MIN_THREADED_WORK,
              "fp32_min_experts": X.FP32_MIN_EXPERTS, "results": {}}
    for dname in a.dtypes.split(","):
        for shape in SHAPES:
            res = compare(*shape, DTYPES[dname], a.repeats, a.rounds)
            report["results"].setdefault(dname, []).append(res)
            print(f"{dname} T={shape[0]} D={shape[1]} F={shape[2]} E={shape[3]} K={shape[4]} "
                  f"work=2^{res['work'].bit_length() - 1} auto: {res['auto_path_fwd_bwd']}/{res['auto_path_fwd']}  "
                  f"loop/threaded fwd+bwd {res['loop_over_threaded_fwd_bwd']['median']:.3f} "
                  f"fwd {res['loop_over_threaded_fwd']['median']:.3f}", file=sys.stderr, flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
