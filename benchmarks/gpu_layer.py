"""The MoE layer on a CUDA GPU in bf16: moecli (grouped GEMM experts, experts.GROUPED_MM) against transformers'
MixtralSparseMoeBlock with its grouped_mm experts implementation, fwd+bwd, same shape, same run.

    python benchmarks/gpu_layer.py [--repeats 20] [--tokens 16384] [--out FILE]

Shapes: d=2048, expert FFN 1408, 64 experts top-6 (fine-grained), and d=4096, FFN 14336, 8 experts top-2 (Mixtral),
each on --tokens tokens. Times are CUDA-synchronised medians after a warm-up, alternating (bench_common.alternate);
> 1 is moecli faster. Needs a GPU (exits 2 without one; --cpu-smoke runs tiny shapes on the CPU to check the
script) and transformers (a test dependency). Run by gpu_check.sh.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_common import alternate, emit  # noqa: E402
from moecli.config import BalanceConfig, MoEConfig  # noqa: E402
from moecli.moe.layer import MoELayer  # noqa: E402

SHAPES = {"fine-grained": dict(D=2048, F=1408, E=64, K=6), "mixtral": dict(D=4096, F=14336, E=8, K=2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU: checks the script, times nothing")
    a = ap.parse_args()
    if not (torch.cuda.is_available() or a.cpu_smoke):
        print("error: benchmarks/gpu_layer.py: torch sees no CUDA GPU (--cpu-smoke checks the script on the CPU)",
              file=sys.stderr)
        sys.exit(2)
    import transformers
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    dev, dt = torch.device("cpu" if a.cpu_smoke else "cuda"), torch.bfloat16
    sync = (lambda: None) if a.cpu_smoke else torch.cuda.synchronize
    shapes = {"smoke": dict(D=64, F=32, E=4, K=2)} if a.cpu_smoke else SHAPES
    res = {"gpu": None if a.cpu_smoke else torch.cuda.get_device_name(), "torch": torch.__version__,
           "transformers": transformers.__version__}
    for name, sh in shapes.items():
        torch.manual_seed(0)
        ours = MoELayer(sh["D"], MoEConfig(num_experts=sh["E"], top_k=sh["K"], expert_ffn=sh["F"]),
                        BalanceConfig()).to(dev, dt)
        cfg = transformers.MixtralConfig(hidden_size=sh["D"], intermediate_size=sh["F"], num_local_experts=sh["E"],
                                         num_experts_per_tok=sh["K"])
        cfg._experts_implementation = "grouped_mm"
        theirs = MixtralSparseMoeBlock(cfg).to(dev, dt)
        with torch.no_grad():
            for p in [*ours.parameters(), *theirs.parameters()]:
                p.normal_(0, 0.02)
        x = torch.randn(1, a.tokens, sh["D"], device=dev, dtype=dt, requires_grad=True)
        g = torch.randn_like(x)

        def step(module, out_of, x=x, g=g):
            def run():
                y = out_of(module(x))
                y.backward(g)
                sync()
            return run

        t = alternate(step(ours, lambda o: o), step(theirs, lambda o: o[0] if isinstance(o, tuple) else o),
                      a.repeats)
        t["moecli_path"] = ours.experts.last_path
        res[name] = {**sh, "tokens": a.tokens, **t}
        print(f"{name}: moecli {t['moecli_ms_median']:.2f} ms ({t['moecli_path']}), transformers grouped_mm "
              f"{t['transformers_ms_median']:.2f} ms: {t['speedup_paired']:.2f}x", file=sys.stderr, flush=True)
        del ours, theirs
        if not a.cpu_smoke:
            torch.cuda.empty_cache()
    emit(res, a.out)


if __name__ == "__main__":
    main()
