"""Upcycle time and peak memory against checkpoint size: streaming converter vs an in-memory baseline.

    python benchmarks/upcycle_memory.py [--d-model 768 --layers 8 --experts 8]

Builds a dense moecli checkpoint, then in separate processes (so each peak RSS
is its own) runs (a) `moe upcycle` (streaming, tensor by tensor) and (b) a
baseline that loads the whole dense state dict, builds the whole MoE state
dict and saves it with safetensors.save_file. Prints sizes, times, peak RSS
and the ratios streaming/baseline.
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

BASELINE = r"""
import sys, torch, json, resource
from safetensors.torch import load_file, save_file
src, dst, E = sys.argv[1], sys.argv[2], int(sys.argv[3])
sd = load_file(src + "/model.safetensors")
out = {}
for k, v in sd.items():
    if ".feed_forward." in k:
        i = k.split(".")[1]
        w = k.split(".")[3]
        name = {"w1": "w1_EDF", "w3": "w3_EDF", "w2": "w2_EFD"}[w]
        out[f"layers.{i}.moe.experts.{name}"] = v.t().unsqueeze(0).repeat(E, 1, 1).contiguous()
        d_model = v.shape[1] if w != "w2" else v.shape[0]
        out.setdefault(f"layers.{i}.moe.router.gate.weight", torch.randn(E, d_model) * 0.02)
    else:
        out[k] = v
save_file(out, dst + "/model.safetensors")
"""


def run_measured(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of a child process."""
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os.execvp(cmd[0], cmd)
    _, status, usage = os.wait4(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"error: command failed: {' '.join(cmd)}")
    return time.perf_counter() - t0, usage.ru_maxrss * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--ffn", type=int, default=3072)
    ap.add_argument("--experts", type=int, default=8)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        tmp = Path(tmp)
        dense = tmp / "dense"
        subprocess.run([sys.executable, "-m", "moecli.cli", "build", "dense", "-o", str(dense),
                        "--set", f"model.d_model={a.d_model}", "--set", f"model.n_layers={a.layers}",
                        "--set", f"model.ffn_dim={a.ffn}", "--set", "model.n_heads=12", "--set", "model.n_kv_heads=4",
                        "--json"], check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
        in_bytes = (dense / "model.safetensors").stat().st_size
        s_time, s_rss = run_measured([sys.executable, "-m", "moecli.cli", "upcycle", str(dense), "-o", str(tmp / "s"),
                                      "-e", str(a.experts), "-k", "2", "--no-verify", "--json"])
        out_bytes = (tmp / "s" / "model.safetensors").stat().st_size
        (tmp / "b").mkdir()
        b_time, b_rss = run_measured([sys.executable, "-c", BASELINE, str(dense), str(tmp / "b"), str(a.experts)])
        idle_time, idle_rss = run_measured([sys.executable, "-c", "import torch, safetensors, moecli.upcycle"])
    report = {
        "dense_bytes": in_bytes, "moe_bytes": out_bytes,
        "streaming": {"seconds": s_time, "peak_rss_bytes": s_rss},
        "in_memory_baseline": {"seconds": b_time, "peak_rss_bytes": b_rss},
        "python_torch_import_rss_bytes": idle_rss,
        "streaming_peak_rss_over_moe_size": s_rss / out_bytes,
        "streaming_rss_above_import_over_moe_size": (s_rss - idle_rss) / out_bytes,
        "streaming_over_baseline_peak_rss": s_rss / b_rss,
        "streaming_over_baseline_time": s_time / b_time,
        "streaming_MB_per_s_written": out_bytes / 2**20 / s_time,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
