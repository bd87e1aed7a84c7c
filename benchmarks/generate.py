"""`moe generate` speed: decoding with the KV cache vs re-running the whole window for every new token.

    python benchmarks/generate.py [--rounds 3]

Both run in this process on the same freshly built (seeded) model, prompt and greedy decoding,
alternating, --rounds times; reported: new tokens/s of each (median of the rounds), the ratio
cached/uncached per round, and whether both produced the same tokens (they should: see
tests/e2e/test_generate.py). Cases: the bundled `mixtral` (d=128, context 256: 32-token prompt, 200
new tokens), and a wider one (`mixtral` with d=512, expert FFN 1024, context 1024: 64-token prompt,
448 new tokens). New tokens stay within the context, where the cache is used throughout.
Then --num-samples: BATCH continuations sampled together (temperature 1) against the same number
sampled one after another, on the bundled `mixtral`, alternating, --rounds times (new tokens/s of all).
Then --prompts: BATCH prompts of 8 to 64 tokens (greedy, 192 new tokens each) in one batch against one
after another, the same way, and whether each prompt got the same tokens both ways.
Then a long prompt: --num-samples BATCH of a 900-token prompt (d=512, context 1024, 64 new tokens,
temperature 1), where the prompt runs once for all samples, against the same batch with the prompt run
for every row (BATCH copies of it as separate prompts), alternating, --rounds times (seconds of each).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moecli.config import prepare_recipe
from moecli.commands.generate import sample, stream, stream_prompts  # noqa: E402
from moecli.model.transformer import build_model  # noqa: E402

BATCH = 8
CASES = {
    "mixtral": ({}, 32, 200),
    "mixtral d512 ctx1024": ({"model.d_model": 512, "moe.expert_ffn": 1024, "model.context": 1024}, 64, 448),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).with_name("results/generate.json")))
    a = ap.parse_args()
    results = {}
    for name, (overrides, prompt_len, new) in CASES.items():
        model = build_model(prepare_recipe("mixtral", overrides)).eval()
        prompt = torch.randint(0, model.recipe.model.vocab_size, (prompt_len,),
                               generator=torch.Generator().manual_seed(0)).tolist()
        times = {True: [], False: []}
        outputs = {}
        for r in range(a.rounds):
            for cached in ((True, False) if r % 2 == 0 else (False, True)):
                t0 = time.perf_counter()
                outputs[cached] = sample(model, prompt, new, 0.0, 0, seed=0, kv_cache=cached)
                times[cached].append(time.perf_counter() - t0)
        ratios = [u / c for c, u in zip(times[True], times[False])]
        res = {
            "prompt_tokens": prompt_len, "new_tokens": new,
            "cached_tokens_per_s": new / statistics.median(times[True]),
            "uncached_tokens_per_s": new / statistics.median(times[False]),
            "speedup_median": statistics.median(ratios), "speedup_per_round": ratios,
            "same_tokens": outputs[True] == outputs[False],
        }
        results[name] = res
        print(f"{name}: cached {res['cached_tokens_per_s']:.1f} tok/s, uncached {res['uncached_tokens_per_s']:.1f} "
              f"tok/s, speedup {res['speedup_median']:.2f}x (rounds {', '.join(f'{x:.2f}' for x in ratios)}), "
              f"same tokens: {res['same_tokens']}", flush=True)
    results["num_samples"] = batched(a.rounds)
    results["prompts"] = batched(a.rounds, prompts=True)
    results["long_prompt"] = long_prompt(a.rounds)
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "rounds": a.rounds}
    Path(a.out).write_text(json.dumps({"info": info, "results": results}, indent=2) + "\n")


def batched(rounds: int, prompts: bool = False) -> dict:
    """BATCH samples of one prompt (temperature 1), or with prompts BATCH prompts of different lengths
    (greedy), in one batch and one after another."""
    model = build_model(prepare_recipe("mixtral", {})).eval()
    g = torch.Generator().manual_seed(0)
    lengths = [8 * (i + 1) for i in range(BATCH)] if prompts else [32]
    ids = [torch.randint(0, model.recipe.model.vocab_size, (n,), generator=g).tolist() for n in lengths]
    # new tokens within the context (256) for every prompt: the cache is used throughout
    new, temperature = (192, 0.0) if prompts else (200, 1.0)
    times = {"batch": [], "one_by_one": []}
    out = {}
    for r in range(rounds):
        for kind in (("batch", "one_by_one") if r % 2 == 0 else ("one_by_one", "batch")):
            t0 = time.perf_counter()
            if kind == "batch" and prompts:
                steps = list(stream_prompts(model, ids, new, temperature, 0, list(range(BATCH))))
                out[kind] = [list(row) for row in zip(*steps)]
            elif kind == "batch":
                list(stream(model, ids[0], new, temperature, 0, 0, num_samples=BATCH))
            else:
                out[kind] = [sample(model, ids[i % len(ids)], new, temperature, 0, seed=i) for i in range(BATCH)]
            times[kind].append(time.perf_counter() - t0)
    ratios = [o / b for b, o in zip(times["batch"], times["one_by_one"])]
    res = {"samples": BATCH, "new_tokens": new,
           "batch_tokens_per_s": BATCH * new / statistics.median(times["batch"]),
           "one_by_one_tokens_per_s": BATCH * new / statistics.median(times["one_by_one"]),
           "speedup_median": statistics.median(ratios), "speedup_per_round": ratios}
    what, same = f"{BATCH} samples of one prompt", ""
    if prompts:
        res.update(prompt_tokens=lengths, same_tokens=out["batch"] == out["one_by_one"])
        what, same = f"{BATCH} prompts of {lengths[0]}-{lengths[-1]} tokens", f", same tokens: {res['same_tokens']}"
    print(f"{what}, mixtral: batch {res['batch_tokens_per_s']:.0f} tok/s, one by one "
          f"{res['one_by_one_tokens_per_s']:.0f} tok/s, speedup {res['speedup_median']:.2f}x "
          f"(rounds {', '.join(f'{x:.2f}' for x in ratios)}){same}", flush=True)
    return res


def long_prompt(rounds: int) -> dict:
    model = build_model(prepare_recipe("mixtral", CASES["mixtral d512 ctx1024"][0])).eval()
    ids = torch.randint(0, model.recipe.model.vocab_size, (900,), generator=torch.Generator().manual_seed(0)).tolist()
    new = 64
    times = {"once": [], "every_row": []}
    for r in range(rounds):
        for kind in (("once", "every_row") if r % 2 == 0 else ("every_row", "once")):
            t0 = time.perf_counter()
            if kind == "once":
                list(stream(model, ids, new, 1.0, 0, 0, num_samples=BATCH))
            else:
                list(stream_prompts(model, [ids] * BATCH, new, 1.0, 0, list(range(BATCH))))
            times[kind].append(time.perf_counter() - t0)
    ratios = [e / o for o, e in zip(times["once"], times["every_row"])]
    res = {"prompt_tokens": len(ids), "samples": BATCH, "new_tokens": new,
           "once_s": statistics.median(times["once"]), "every_row_s": statistics.median(times["every_row"]),
           "speedup_median": statistics.median(ratios), "speedup_per_round": ratios}
    print(f"{BATCH} samples of a {len(ids)}-token prompt, d512: prompt once {res['once_s']:.2f} s, every row "
          f"{res['every_row_s']:.2f} s, speedup {res['speedup_median']:.2f}x "
          f"(rounds {', '.join(f'{x:.2f}' for x in ratios)})", flush=True)
    return res


if __name__ == "__main__":
    main()
