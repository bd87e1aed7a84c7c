"""MoE layer speed: moecli's layer vs a dense SwiGLU of equal active FLOPs and Hugging Face's MoE block.

    python benchmarks/moe_layer.py [--repeats 5] [--dtypes fp32,bf16] [--shapes small,many]

Shapes (4096 tokens each):  small: d=512, expert FFN 1024, 8 experts top-2 (dense FFN 2048)
                            many:  d=256, expert FFN 512, 64 experts top-8 (dense FFN 4096)
Everything is measured in this run, on this machine: median of --repeats after a
warm-up. Ratios are speeds (other_time / moecli_time): 1.0 = as fast. Each ratio to dense
and to transformers is given two ways: the median over alternating moecli/other pairs
(robust to the machine's drift: bf16 times on this VM vary by up to 2x from one call to
the next), and "_of_medians", the other's median time over moecli's, each timed on its
own (the pairs can be skewed by the heap state one side's frees leave for the other's next
call). A target counts as met only when both are.
Also printed: achieved GFLOP/s (active FLOPs) against this machine's torch.mm
peak on a 2048^3 product; the same layer with torch._grouped_mm experts in place of
moecli's (a path moecli does not take: slower here); and, where moecli takes its
threaded expert path (moecli/experts.py: use_threads), the same layer held to the
per-expert loop. Hugging Face's block (transformers' Mixtral, every experts
implementation that runs here) is timed when transformers is installed.
--fresh-inputs gives every call a different input (so the routing and each expert's row count change,
as in training) instead of one fixed input; in bf16 that is where kernels for new product shapes get
built (moecli pads its expert rows to a few sizes: experts.PAD_ROWS).
--breakdown adds fwd+bwd times of the experts alone and of the routing alone (see breakdown()).
Every run also times the products floor (products_floor()): the experts' nine matrix products per expert
(three forward, six backward) at the layer's row counts, alone, one after another on this process's
threads, into outputs allocated once. In fp32, where torch.mm splits these products well over the threads,
no implementation doing the same products takes less, so transformers' time over the floor bounds the
ratio to transformers any exact implementation could reach on this machine. (Not in bf16: there the
products run faster one per core side by side, as moecli's threaded path runs them.)
--runs N repeats everything in N fresh processes and reports each ratio's median, min and max:
the dense baseline's speed depends on the process's heap state (page faults), so one process's
ratio is one draw.
--isolated N instead times moecli, the dense SwiGLU and each transformers implementation each alone in
its own fresh process (fwd+bwd), N rounds, once under the default allocator and once with glibc told to
keep freed memory (no page faults), and reports ratios of the medians over the rounds: no side's
allocations shape the other's heap.
Targets on 2 CPU cores: fwd+bwd >= 0.9x dense (small), >= 0.75x dense (many),
>= 1.2x the fastest transformers implementation.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moecli.config import BalanceConfig, MoEConfig  # noqa: E402
from moecli.moe.experts import SwiGLU  # noqa: E402
from moecli.moe.layer import MoELayer  # noqa: E402

SHAPES = {"small": dict(T=4096, D=512, F=1024, E=8, K=2), "many": dict(T=4096, D=256, F=512, E=64, K=8)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TARGETS = {"small": 0.9, "many": 0.75}  # fwd+bwd speed vs dense
HF_TARGET = 1.2  # fwd+bwd speed vs the fastest transformers implementation


def timeit(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def paired_ratio(fast_candidate, baseline, repeats: int) -> float:
    """Median over alternating pairs of baseline_time / candidate_time (robust to a drifting machine)."""
    fast_candidate(), baseline()
    ratios = []
    for r in range(repeats):
        pair = {}
        for name, fn in ((("c", fast_candidate), ("b", baseline)) if r % 2 == 0 else
                         (("b", baseline), ("c", fast_candidate))):
            t0 = time.perf_counter()
            fn()
            pair[name] = time.perf_counter() - t0
        ratios.append(pair["b"] / pair["c"])
    return statistics.median(ratios)


def mm_peak(dtype, repeats: int) -> float:
    a = torch.randn(2048, 2048, dtype=dtype)
    b = torch.randn(2048, 2048, dtype=dtype)
    return 2 * 2048**3 / timeit(lambda: torch.mm(a, b), repeats) / 1e9


def fwd_bwd(module, x, g, out_of=lambda o: o, pool=None):
    """The forward (no grad) and fwd+bwd calls timed; with a pool of inputs (--fresh-inputs), each call
    takes the next one, so the routing and every expert's row count change from call to call."""
    nxt = itertools.cycle(pool).__next__ if pool else (lambda: x)

    def fwd():
        with torch.no_grad():
            module(nxt())

    def both():
        xi = nxt()
        xi.grad = None
        module.zero_grad(set_to_none=True)
        out_of(module(xi)).backward(g)

    return fwd, both


FRESH_POOL = 64  # inputs per shape with --fresh-inputs: more than any implementation's calls here


def input_pool(x, size: int) -> list:
    """size seeded inputs shaped like x (--fresh-inputs)."""
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(x.shape, generator=gen).to(x.dtype).requires_grad_() for _ in range(size)]


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient (torch._grouped_mm needs one)."""

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


def grouped_mm_variant(layer):
    """A copy of moecli's layer whose experts use torch._grouped_mm instead of the per-expert loop.

    Timed beside the real layer to show which path is faster on this device and dtype; its output
    is checked equal to moecli's (to rounding) before timing.
    """
    import copy

    import torch.nn.functional as F

    v = copy.deepcopy(layer)
    ex = v.experts

    def forward(x_ND, counts_E, w_N=None):
        offs = torch.cumsum(counts_E, 0).to(torch.int32)
        a = _ContiguousGrad.apply(torch._grouped_mm(x_ND, ex.w1_EDF, offs=offs))
        b = _ContiguousGrad.apply(torch._grouped_mm(x_ND, ex.w3_EDF, offs=offs))
        y = _ContiguousGrad.apply(torch._grouped_mm(F.silu(a) * b, ex.w2_EFD, offs=offs))
        return y if w_N is None else y * w_N.to(y.dtype).unsqueeze(-1)

    ex.forward = forward
    return v


def loop_variant(layer):
    """A copy of moecli's layer held to the per-expert loop (experts.THREADED = False in its forward),
    timed beside the real layer where that takes the threaded path (experts.use_threads)."""
    import copy

    from moecli.moe import experts as experts_mod

    v = copy.deepcopy(layer)
    ex = v.experts
    plain = ex.forward

    def forward(x_ND, counts_E, w_N=None):
        saved, experts_mod.THREADED = experts_mod.THREADED, False
        try:
            return plain(x_ND, counts_E, w_N)
        finally:
            experts_mod.THREADED = saved

    ex.forward = forward
    return v


def breakdown(ours, dense, x, g, repeats: int) -> dict:
    """Where the layer's time goes: its experts alone (on tokens already sorted by expert), its
    routing alone (router, sort, gather, weighted combine and their backward, experts replaced by
    an identity that applies the combine weights), the whole layer, and the dense SwiGLU.
    Milliseconds, fwd+bwd, medians."""
    import copy

    from moecli.moe.layer import dispatch

    T, D = x.shape[1], x.shape[2]
    with torch.no_grad():
        route = ours.router(x.view(T, D))
    d = dispatch(route.idx_TK, route.keep_TK, ours.cfg.num_experts)
    x_ND = x.detach().view(T, D).index_select(0, d.token_N).requires_grad_()
    g_ND = torch.randn_like(x_ND)
    experts = ours.experts

    def experts_only():
        x_ND.grad = None
        experts.zero_grad(set_to_none=True)
        experts(x_ND, d.counts_E).backward(g_ND)

    routing = copy.deepcopy(ours)
    routing.experts.forward = lambda x_ND, counts_E, w_N: x_ND * w_N.to(x_ND.dtype).unsqueeze(-1)
    out = {}
    for name, fn in (("dense", fwd_bwd(dense, x, g)[1]), ("experts_only", experts_only),
                     ("routing_only", fwd_bwd(routing, x, g)[1]), ("layer", fwd_bwd(ours, x, g)[1])):
        out[f"{name}_ms"] = timeit(fn, repeats) * 1e3
    return out


def products_floor(layer, x):
    """A function running only the matrix products of the layer's experts, fwd+bwd, for input x: per expert
    with m rows (its routed rows for x, padded as the layer pads them), x_mD @ w1, x_mD @ w3, h_mF @ w2
    forward and dy_mD @ w2^T, h^T @ dy, x^T @ da, x^T @ db, da @ w1^T, db @ w3^T backward, in the weights'
    dtype, transposes as views (as autograd passes them). Operands are random tensors of those shapes and
    the outputs are allocated once, so the time is the products' and nothing else's."""
    from moecli.moe import experts as X
    from moecli.moe.layer import dispatch

    ex = layer.experts
    T, D = x.shape[1], x.shape[2]
    with torch.no_grad():
        route = layer.router(x.detach().view(T, D))
    counts = dispatch(route.idx_TK, route.keep_TK, ex.num_experts).counts_E.tolist()
    pad = X.pad_rows(x.view(T, D), ex.w1_EDF)
    F = ex.hidden
    w1, w3, w2 = (w.detach() for w in (ex.w1_EDF, ex.w3_EDF, ex.w2_EFD))
    gen = torch.Generator().manual_seed(2)
    jobs = []
    for e, n in enumerate(counts):
        m = X.padded_rows(n) if pad else n
        if m == 0:
            continue
        x_mD, dy_mD, h_mF = (torch.randn(m, k, generator=gen).to(w1.dtype) for k in (D, D, F))
        products = [(x_mD, w1[e]), (x_mD, w3[e]), (h_mF, w2[e]),  # forward
                    (dy_mD, w2[e].t()), (h_mF.t(), dy_mD), (x_mD.t(), h_mF), (x_mD.t(), h_mF),  # backward
                    (h_mF, w1[e].t()), (h_mF, w3[e].t())]
        jobs += [(a, b, a.new_empty(a.shape[0], b.shape[1])) for a, b in products]

    def run():
        for a, b, out in jobs:
            torch.mm(a, b, out=out)

    return run


def make_case(sh, dtype):
    """Input, output gradient, moecli's layer and the dense SwiGLU for one shape; seeded, so every
    process builds the same ones."""
    torch.manual_seed(0)
    T, D, F, E, K = sh["T"], sh["D"], sh["F"], sh["E"], sh["K"]
    x = torch.randn(1, T, D, dtype=dtype, requires_grad=True)
    g = torch.randn(1, T, D, dtype=dtype)
    ours = MoELayer(D, MoEConfig(num_experts=E, top_k=K, expert_ffn=F), BalanceConfig()).to(dtype)
    with torch.no_grad():
        ours.router.gate.weight.normal_(0, 0.02)
    dense = SwiGLU(D, K * F).to(dtype)
    return x, g, ours, dense


def time_alone(kind: str, dname: str, sname: str, repeats: int) -> dict:
    """fwd+bwd median of one implementation ("moecli", "dense" or "hf_<impl>"), the only thing this process
    runs (--only): no other implementation's allocations shape its heap."""
    sh, dtype = SHAPES[sname], DTYPES[dname]
    x, g, ours, dense = make_case(sh, dtype)
    if kind.startswith("hf_"):
        module, out_of = hf_block(sh, dtype, kind[3:]), hf_output
    else:
        module, out_of = {"moecli": ours, "dense": dense}[kind], lambda o: o
    return {"kind": kind, "fwd_bwd_s": timeit(fwd_bwd(module, x, g, out_of)[1], repeats)}


# glibc keeps freed memory instead of returning it (no page faults on reuse); see the README
NO_PAGE_FAULTS_ENV = {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184"}


def isolated(rounds: int, a) -> dict:
    """Each implementation timed alone in its own fresh process, `rounds` times, the order of the
    implementations rotated each round; once under the default allocator and once with page faults
    taken out (NO_PAGE_FAULTS_ENV). Ratios: the other's median over the rounds / moecli's, and per round."""
    import os
    import subprocess

    kinds = ["moecli", "dense"] + ([f"hf_{impl}" for impl in a.hf_impls.split(",")] if use_hf(a) else [])
    out: dict = {"rounds": rounds, "repeats": a.repeats, "allocators": {}}
    for alloc, env in (("default", {}), ("no_page_faults", NO_PAGE_FAULTS_ENV)):
        for dname in a.dtypes.split(","):
            for sname in a.shapes.split(","):
                times: dict = {k: [] for k in kinds}
                for r in range(rounds):
                    for kind in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:
                        cmd = [sys.executable, __file__, "--only", kind, "--dtypes", dname, "--shapes", sname,
                               "--repeats", str(a.repeats)]
                        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=os.environ | env)
                        if done.returncode == 0:
                            times[kind].append(json.loads(done.stdout)["fwd_bwd_s"])
                        elif not kind.startswith("hf_"):  # an hf implementation may not run here
                            raise SystemExit(f"{' '.join(cmd)} failed")
                med = {k: statistics.median(v) for k, v in times.items() if v}
                res = {"fwd_bwd_s": times, "fwd_bwd_s_median": med,
                       "fwd_bwd_speed_vs_dense": med["dense"] / med["moecli"],
                       "fwd_bwd_speed_vs_dense_per_round": [d / m for d, m in zip(times["dense"], times["moecli"])],
                       "target_vs_dense": TARGETS[sname]}
                res["meets_dense_target"] = res["fwd_bwd_speed_vs_dense"] >= TARGETS[sname]
                hf = [k for k in med if k.startswith("hf_")]
                if hf:
                    best = min(hf, key=med.get)
                    res |= {"best_hf": best, "fwd_bwd_speed_vs_best_hf": med[best] / med["moecli"],
                            "meets_hf_target": med[best] / med["moecli"] >= HF_TARGET}
                out["allocators"].setdefault(alloc, {}).setdefault(dname, {})[sname] = res
                print(f"{alloc} {dname} {sname}: " + json.dumps({k: v for k, v in res.items() if "speed" in k}),
                      file=sys.stderr)
    return out


def use_hf(a) -> bool:
    """Time transformers' block: installed, and not turned off with --no-hf."""
    if a.no_hf:
        return False
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def hf_output(o):
    """The hidden states from transformers' block output (a tuple with the router logits, or the tensor)."""
    return o[0] if isinstance(o, tuple) else o


def hf_block(sh, dtype, impl):
    import transformers
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = transformers.MixtralConfig(hidden_size=sh["D"], intermediate_size=sh["F"], num_local_experts=sh["E"],
                                     num_experts_per_tok=sh["K"])
    cfg._experts_implementation = impl
    block = MixtralSparseMoeBlock(cfg).to(dtype)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
    return block


def over_runs(runs: int) -> dict:
    """The benchmark run `runs` times, each in a fresh Python process with this one's arguments less
    --runs; every numeric summary field as median/min/max over the runs, targets judged on the median."""
    import subprocess

    args, skip = [], False
    for arg in sys.argv[1:]:  # drop --runs N / --runs=N
        if skip:
            skip = False
        elif arg == "--runs":
            skip = True
        elif not arg.startswith("--runs="):
            args.append(arg)
    reports = []
    for i in range(runs):
        print(f"run {i + 1}/{runs}", file=sys.stderr)
        done = subprocess.run([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True, check=True)
        reports.append(json.loads(done.stdout))
    summary: dict = {}
    for dname, per_dtype in reports[0]["results"].items():
        for sname in per_dtype:
            if sname == "mm_peak_gflops":
                continue
            each = [r["results"][dname][sname]["summary"] for r in reports]
            out = {}
            for key, first in each[0].items():
                if key == "target_vs_dense":
                    out[key] = first
                elif isinstance(first, float):
                    vals = [e[key] for e in each]
                    out[key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals),
                                "values": vals}
            out["meets_dense_target"] = min(out["fwd_bwd_speed_vs_dense"]["median"],
                                            out["fwd_bwd_speed_vs_dense_of_medians"]["median"]) >= TARGETS[sname]
            if "fwd_bwd_speed_vs_best_hf" in out:
                out["meets_hf_target"] = min(out["fwd_bwd_speed_vs_best_hf"]["median"],
                                             out["fwd_bwd_speed_vs_best_hf_of_medians"]["median"]) >= HF_TARGET
            summary.setdefault(dname, {})[sname] = out
            for kind in ("", "_of_medians"):
                ratio = out["fwd_bwd_speed_vs_dense" + kind]
                print(f"{dname} {sname}: fwd+bwd vs dense{kind or ' (paired)'} median {ratio['median']:.3f} "
                      f"(min {ratio['min']:.3f}, max {ratio['max']:.3f})", file=sys.stderr)
    return {"runs": runs, "summary": summary, "per_run": reports}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--shapes", default="small,many")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers even when installed")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time the experts alone and the routing alone (where the gap to dense comes from)")
    ap.add_argument("--hf-impls", default="eager,grouped_mm",
                    help="transformers experts implementations to time; batched_mm is left out by default because "
                         "it materialises a weight copy per token (34 GB at these shapes: it fails or is OOM-killed)")
    ap.add_argument("--runs", type=int, default=1,
                    help="run the whole benchmark this many times, each in a fresh process, and report the median, "
                         "min and max of every ratio (the dense baseline's speed depends on the process's heap "
                         "state: see the README)")
    ap.add_argument("--isolated", type=int, default=0, metavar="ROUNDS",
                    help="instead: time each implementation alone in its own fresh process, ROUNDS times, under "
                         "the default allocator and without page faults (fwd+bwd ratios of medians only)")
    ap.add_argument("--fresh-inputs", action="store_true",
                    help="a different input on every call (new routing, new row counts per expert, as in "
                         "training) instead of one fixed input; in bf16 this is where oneDNN builds kernels for "
                         "new product shapes (README, 'bf16 training')")
    ap.add_argument("--only", help=argparse.SUPPRESS)  # one implementation, one dtype and shape (--isolated's runs)
    a = ap.parse_args()
    if a.only:
        print(json.dumps(time_alone(a.only, a.dtypes, a.shapes, a.repeats)))
        return
    if a.isolated:
        print(json.dumps(isolated(a.isolated, a), indent=2))
        return
    if a.runs > 1:
        print(json.dumps(over_runs(a.runs), indent=2))
        return
    torch.manual_seed(0)
    have_hf = use_hf(a)
    report = {"threads": torch.get_num_threads(), "torch": torch.__version__, "fresh_inputs": a.fresh_inputs,
              "results": {}}
    for dname in a.dtypes.split(","):
        dtype = DTYPES[dname]
        peak = mm_peak(dtype, a.repeats)
        report["results"].setdefault(dname, {"mm_peak_gflops": peak})
        for sname in a.shapes.split(","):
            sh = SHAPES[sname]
            flops = 2 * sh["T"] * sh["K"] * 3 * sh["D"] * sh["F"]  # active forward FLOPs of the experts
            x, g, ours, dense = make_case(sh, dtype)
            pool = input_pool(x, FRESH_POOL) if a.fresh_inputs else None
            rows, fns = {}, {}
            variants = [("moecli", ours, lambda o: o), ("dense", dense, lambda o: o)]
            if hasattr(torch, "_grouped_mm"):
                gv = grouped_mm_variant(ours)
                with torch.no_grad():
                    torch.testing.assert_close(gv(x), ours(x))
                variants.append(("moecli_grouped_mm", gv, lambda o: o))
            ours(x)  # autograd on, as in the fwd+bwd timings (fp32 takes the threaded path only with a backward)
            threaded = ours.experts.last_path == "threaded"
            if threaded:
                lv = loop_variant(ours)
                # to rounding: see tests/unit/test_expert_threads.py
                torch.testing.assert_close(lv(x).detach(), ours(x).detach())
                variants.append(("moecli_loop", lv, lambda o: o))
            for name, mod, out_of in variants:
                f, b = fwd_bwd(mod, x, g, out_of, pool)
                fns[name] = (f, b)
                rows[name] = {"fwd_s": timeit(f, a.repeats), "fwd_bwd_s": timeit(b, a.repeats)}
            floor_s = timeit(products_floor(ours, x), a.repeats)
            if have_hf:
                for impl in a.hf_impls.split(","):
                    try:
                        blk = hf_block(sh, dtype, impl)
                        f, b = fwd_bwd(blk, x, g, hf_output, pool)
                        f()
                        fns[f"hf_{impl}"] = (f, b)
                        rows[f"hf_{impl}"] = {"fwd_s": timeit(f, a.repeats), "fwd_bwd_s": timeit(b, a.repeats)}
                    except Exception as e:  # an implementation that does not run on this device/dtype
                        rows[f"hf_{impl}"] = {"error": f"{type(e).__name__}: {str(e)[:120]}"}
            for r in rows.values():
                if "fwd_s" in r:
                    r["fwd_gflops"] = flops / r["fwd_s"] / 1e9
                    r["fwd_bwd_gflops"] = 3 * flops / r["fwd_bwd_s"] / 1e9
                    r["fwd_bwd_of_mm_peak"] = r["fwd_bwd_gflops"] / peak
            summary = {}
            if "moecli_grouped_mm" in fns:  # > 1 would mean grouped_mm is the faster path here
                summary["grouped_mm_speed_vs_moecli_fwd_bwd"] = paired_ratio(fns["moecli_grouped_mm"][1],
                                                                           fns["moecli"][1], a.repeats)
            summary["expert_path"] = "threaded" if threaded else "loop"
            if "moecli_loop" in fns:  # > 1: the threaded path is faster than the loop
                summary["threaded_speed_vs_loop_fwd_bwd"] = paired_ratio(fns["moecli"][1], fns["moecli_loop"][1],
                                                                         a.repeats)
            summary |= {"fwd_speed_vs_dense": paired_ratio(fns["moecli"][0], fns["dense"][0], a.repeats),
                        "fwd_bwd_speed_vs_dense": paired_ratio(fns["moecli"][1], fns["dense"][1], a.repeats),
                        "target_vs_dense": TARGETS[sname]}
            # the same ratio from the separately timed medians: the pairs can be skewed when one side's
            # frees leave the heap so that the other side's next call page-faults (README, "Measured")
            summary["fwd_bwd_speed_vs_dense_of_medians"] = rows["dense"]["fwd_bwd_s"] / rows["moecli"]["fwd_bwd_s"]
            summary["meets_dense_target"] = min(summary["fwd_bwd_speed_vs_dense"],
                                                summary["fwd_bwd_speed_vs_dense_of_medians"]) >= TARGETS[sname]
            # the products alone, fwd+bwd, and the share of moecli's layer time they take
            summary["products_floor_ms"] = floor_s * 1e3
            summary["products_share_of_moecli_fwd_bwd"] = floor_s / rows["moecli"]["fwd_bwd_s"]
            hf_ok = [k for k, v in rows.items() if k.startswith("hf_") and "fwd_bwd_s" in v]
            if hf_ok:  # the fastest implementation by median, then paired against moecli
                best_fb = min(hf_ok, key=lambda k: rows[k]["fwd_bwd_s"])
                best_f = min(hf_ok, key=lambda k: rows[k]["fwd_s"])
                summary["best_hf_fwd_bwd"], summary["best_hf_fwd"] = best_fb, best_f
                summary["fwd_bwd_speed_vs_best_hf"] = paired_ratio(fns["moecli"][1], fns[best_fb][1], a.repeats)
                summary["fwd_speed_vs_best_hf"] = paired_ratio(fns["moecli"][0], fns[best_f][0], a.repeats)
                summary["fwd_bwd_speed_vs_best_hf_of_medians"] = (rows[best_fb]["fwd_bwd_s"]
                                                                  / rows["moecli"]["fwd_bwd_s"])
                summary["meets_hf_target"] = min(summary["fwd_bwd_speed_vs_best_hf"],
                                                 summary["fwd_bwd_speed_vs_best_hf_of_medians"]) >= HF_TARGET
                # the ratio to transformers of an implementation that spent no time beyond its products
                summary["best_hf_over_products_floor"] = rows[best_fb]["fwd_bwd_s"] / floor_s
            if a.breakdown:
                summary["breakdown_fwd_bwd"] = {k: round(v, 2) for k, v in breakdown(ours, dense, x, g,
                                                                                     a.repeats).items()}
            report["results"][dname][sname] = {"shape": sh, "timings": rows, "summary": summary}
            print(f"{dname} {sname}: " + json.dumps(summary), file=sys.stderr)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
