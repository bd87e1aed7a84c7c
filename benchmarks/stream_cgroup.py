"""Layer streaming in a memory cgroup: `moe inspect-routing` on a 3.2 GB MoE checkpoint inside a cgroup limited to
1 GiB (well below the model) against the same command unconstrained, in memory and with --stream.

    sudo python benchmarks/stream_cgroup.py [--limit-mb 1024] [--out benchmarks/results/stream_cgroup.json]

Needs root and a memory cgroup (v1: /sys/fs/cgroup/memory, or v2 with the memory controller); it makes one,
moecli-stream-bench, and removes it. The model: the mixtral recipe at d=1024, 8 layers, 16 experts of 2048, random
weights, fp32 (`moe build -o`). Each run is a fresh process; time and peak RSS (ru_maxrss) for each, and for the
constrained run the cgroup's own peak (page cache included). Inside the cgroup moecli sees the limit as the memory
available, so it streams by itself (no --stream given) and says so. Routing shares must equal the unconstrained
run's to 1e-6.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_common import emit  # noqa: E402
NAME = "moecli-stream-bench"
SHAPE = ["--set", "model.d_model=1024", "--set", "model.n_heads=8", "--set", "model.n_kv_heads=2",
         "--set", "model.n_layers=8", "--set", "moe.num_experts=16", "--set", "moe.expert_ffn=2048",
         "--set", "model.context=512"]


def cgroup(limit: int) -> tuple[Path, Path | None]:
    """(the cgroup's directory, its peak-usage file or None) with the memory limit set."""
    v1 = Path("/sys/fs/cgroup/memory")
    if v1.is_dir():
        d = v1 / NAME
        d.mkdir(exist_ok=True)
        (d / "memory.limit_in_bytes").write_text(str(limit))
        return d, d / "memory.max_usage_in_bytes"
    d = Path("/sys/fs/cgroup") / NAME
    d.mkdir(exist_ok=True)
    (d / "memory.max").write_text(str(limit))
    (d / "memory.swap.max").write_text("0") if (d / "memory.swap.max").exists() else None
    peak = d / "memory.peak"
    return d, peak if peak.exists() else None


def run(cmd: list[str], cg: Path | None = None) -> tuple[float, int, str, str]:
    """Wall seconds, peak RSS (bytes), stdout and stderr of a child (moved into cgroup cg first)."""
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        if cg is not None:
            (cg / "cgroup.procs").write_text(str(os.getpid()))
        os.chdir(ROOT)
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        os.execvp(cmd[0], cmd)
    _, status, usage = os.wait4(pid, 0)
    seconds = time.perf_counter() - t0
    out.seek(0), err.seek(0)
    o, e = out.read().decode(), err.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"error: {' '.join(cmd)} failed: {e[-2000:]}")
    return seconds, usage.ru_maxrss * 1024, o, e


def shares(res: dict) -> dict:
    return {layer: [e["load"] for e in rep["experts"]] for layer, rep in res["layers"].items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit-mb", type=int, default=1024)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    limit = a.limit_mb * 2**20
    moe = [sys.executable, "-m", "moecli.cli"]
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        tmp = Path(tmp)
        subprocess.run(moe + ["build", "mixtral", "-o", str(tmp / "m"), *SHAPE], check=True, cwd=ROOT,
                       stdout=subprocess.DEVNULL)
        size = (tmp / "m" / "model.safetensors").stat().st_size
        text = tmp / "t.txt"
        text.write_bytes((ROOT.parent / "shared" / "data" / "austen.txt").read_bytes()[:300_000]
                         if (ROOT.parent / "shared" / "data" / "austen.txt").is_file() else b"moecli " * 50_000)
        args = ["inspect-routing", str(tmp / "m"), str(text), "--max-tokens", "16384", "--seq-len", "256", "--json"]
        report = {"model_bytes": size, "limit_bytes": limit, "runs": {}}
        for name, extra in (("in_memory", []), ("stream", ["--stream"])):
            t, rss, o, _ = run(moe + args + extra)
            report["runs"][name] = {"seconds": t, "peak_rss_bytes": rss, "shares": shares(json.loads(o))}
        cg, peak_file = cgroup(limit)
        try:
            t, rss, o, e = run(moe + args, cg)
            res = json.loads(o)
            report["runs"]["cgroup"] = {"seconds": t, "peak_rss_bytes": rss, "shares": shares(res),
                                        "cgroup_peak_bytes": int(peak_file.read_text()) if peak_file else None,
                                        "streamed": res.get("streamed")}
        finally:
            cg.rmdir()
    ref = report["runs"]["in_memory"]["shares"]
    for name in ("stream", "cgroup"):
        got = report["runs"][name]["shares"]
        report["runs"][name]["max_share_diff"] = max(abs(x - y) for k in ref for x, y in zip(ref[k], got[k]))
    for r in report["runs"].values():
        r.pop("shares")
    report["stream_over_in_memory_time"] = report["runs"]["stream"]["seconds"] / report["runs"]["in_memory"]["seconds"]
    emit(report, a.out)


if __name__ == "__main__":
    main()
