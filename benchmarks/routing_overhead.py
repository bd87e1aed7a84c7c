"""Cost of routing statistics: `moe inspect-routing`'s collection vs a plain forward over the same tokens.

    python benchmarks/routing_overhead.py [--recipe mixtral] [--tokens 65536]

Both passes run here on the same freshly built model and the same windows; the
best of --repeats is taken for each. Target: stats/plain <= 1.10.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moecli.config import prepare_recipe
from moecli.model.transformer import build_model  # noqa: E402
from moecli.commands.inspect_routing import Stream, run_routing  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", action="append", help="repeatable; default: mixtral and qwen3-moe")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    out = {}
    for name in a.recipe or ["mixtral", "qwen3-moe"]:
        model = build_model(prepare_recipe(name)).eval()
        seq = model.recipe.train.seq_len
        ids = torch.randint(0, model.recipe.model.vocab_size, (a.tokens,), generator=torch.Generator().manual_seed(0))
        stream = Stream(ids, seq)

        @torch.no_grad()
        def plain():
            for x in stream.batches(8):
                model(x)

        def stats():
            run_routing(model, stream, 8, capacity_factor=1.25)

        times = {"plain": [], "stats": []}
        plain()  # warm-up
        stats()
        for r in range(a.repeats):  # alternate the order so neither pass always runs on a warmer machine
            order = (("plain", plain), ("stats", stats)) if r % 2 == 0 else (("stats", stats), ("plain", plain))
            for key, fn in order:
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
        ratios = sorted(s_ / p_ for s_, p_ in zip(times["stats"], times["plain"]))
        median = ratios[len(ratios) // 2]
        out[name] = {"plain_s_median": sorted(times["plain"])[a.repeats // 2],
                     "stats_s_median": sorted(times["stats"])[a.repeats // 2],
                     "ratio_median_of_pairs": median, "ratio_min_over_min": min(times["stats"]) / min(times["plain"]),
                     "target_ratio_at_most": 1.10, "meets_target": median <= 1.10}
    print(json.dumps({"tokens": a.tokens, "threads": torch.get_num_threads(), "results": out}, indent=2))


if __name__ == "__main__":
    main()
