"""What the layer benchmarks share: moecli against a peer, alternating in one process, and the report."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def layer_args(doc: str) -> argparse.Namespace:
    """--repeats, --tokens and --out, as every layer benchmark takes them."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--out", type=Path)
    return ap.parse_args()


def alternate(ours, theirs, repeats: int) -> dict:
    """Time ours() and theirs() (each warmed up once) ``repeats`` times each, the order swapped every repeat; the
    medians in ms and theirs over ours, paired per repeat and of medians (> 1: moecli faster)."""
    ours(), theirs()
    t_ours, t_theirs = [], []
    for r in range(repeats):
        order = ((ours, t_ours), (theirs, t_theirs))
        for fn, times in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return {"moecli_ms_median": 1e3 * statistics.median(t_ours),
            "transformers_ms_median": 1e3 * statistics.median(t_theirs),
            "speedup_paired": statistics.median(t / o for t, o in zip(t_theirs, t_ours)),
            "speedup_of_medians": statistics.median(t_theirs) / statistics.median(t_ours)}


def emit(res: dict, out: Path | None) -> None:
    """The report on stdout, and in ``out`` when given."""
    text = json.dumps(res, indent=2)
    print(text)
    if out:
        out.write_text(text + "\n")
