"""moe upcycle (verified) against mergekit-moe on one job: a random dense Llama of a 135M-parameter shape (d=576,
30 layers, FFN 1536, 9 heads / 3 KV heads, vocab 49152, tied, fp32) -> 8 experts top-2 Mixtral.

    python benchmarks/upcycle_vs_mergekit.py --install-mergekit   # once: mergekit into its own venv (asks pip)
    python benchmarks/upcycle_vs_mergekit.py [--runs 5] [--out benchmarks/results/upcycle_vs_mergekit.json]

mergekit is not a moecli dependency: --install-mergekit makes a venv (benchmarks/.venv-mergekit, no system site
packages) with torch==2.13.0 and mergekit, and the benchmark runs its mergekit-moe from there. The two tools run
alternately in fresh processes, `runs` times each; wall time and peak RSS (ru_maxrss of the child, from the OS)
per run, ratios of medians (moecli / mergekit: < 1 is moecli faster or smaller). Targets: time <= 0.7x, peak RSS
<= 0.5x, with moecli's verification on. Single source, so both outputs' expert tensors must be the dense FFN's:
checked tensor by tensor against each other (the routers differ: random in both).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_common import emit  # noqa: E402
VENV = ROOT / "benchmarks" / ".venv-mergekit"
SHAPE = {"model.d_model": 576, "model.n_layers": 30, "model.ffn_dim": 1536, "model.n_heads": 9,
         "model.n_kv_heads": 3, "model.vocab_size": 49152, "model.tie_embeddings": True, "model.context": 2048}
EXPERTS, TOP_K = 8, 2


def install() -> None:
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["torch==2.13.0"], check=True)
    subprocess.run(pip + ["mergekit"], check=True)
    print(f"mergekit installed in {VENV}")


def run_measured(cmd: list[str], cwd=None) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of a child process."""
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        if cwd:
            os.chdir(cwd)
        devnull = os.open(os.devnull, os.O_WRONLY)  # the tools' own output (and progress) stays off the report
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.execvp(cmd[0], cmd)
    _, status, usage = os.wait4(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"error: command failed: {' '.join(cmd)}")
    return time.perf_counter() - t0, usage.ru_maxrss * 1024


def make_dense(tmp: Path) -> Path:
    """The dense Llama: a moecli dense recipe of the shape, random weights, exported as Hugging Face llama, with a
    tokenizer.json (mergekit copies the base's tokenizer)."""
    ckpt, hf = tmp / "dense-moecli", tmp / "dense"
    sets = [x for k, v in SHAPE.items() for x in ("--set", f"{k}={json.dumps(v)}")]
    subprocess.run([sys.executable, "-m", "moecli.cli", "build", "dense", "-o", str(ckpt), "--seed", "0", *sets],
                   check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    subprocess.run([sys.executable, "-m", "moecli.cli", "export", str(ckpt), "-o", str(hf), "--format", "llama"],
                   check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    write_tokenizer(hf)
    return hf


def write_tokenizer(d: Path) -> None:
    """A word-level tokenizer.json over the vocabulary (mergekit-moe loads the base's tokenizer)."""
    vocab = {"<unk>": 0, **{f"t{i}": i for i in range(1, SHAPE["model.vocab_size"])}}
    tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
           "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
           "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}}
    (d / "tokenizer.json").write_text(json.dumps(tok))
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                         "unk_token": "<unk>", "model_max_length": 2048}))


def mergekit_config(dense: Path, path: Path) -> None:
    experts = "".join(f"  - source_model: {dense}\n    positive_prompts: [\"t{e + 1}\"]\n" for e in range(EXPERTS))
    path.write_text(f"base_model: {dense}\ngate_mode: random\ndtype: float32\nexperts_per_token: {TOP_K}\n"
                    f"experts:\n{experts}")


def expert_ffns(d: Path, layers: int) -> dict:
    """{(layer, expert): (gate (F, D), up (F, D), down (D, F))} of a Mixtral directory, per-expert names (moecli's
    output: block_sparse_moe.experts.E.w1/w3/w2) or transformers 5's fused ones (mergekit's:
    mlp.experts.gate_up_proj (E, 2F, D), down_proj (E, D, F))."""
    from safetensors import safe_open

    handles = [safe_open(str(f), "pt") for f in sorted(d.glob("*.safetensors"))]
    names = {k: h for h in handles for k in h.keys()}
    out = {}
    for i in range(layers):
        fused = f"model.layers.{i}.mlp.experts.gate_up_proj"
        if fused in names:
            gate, up = names[fused].get_tensor(fused).chunk(2, dim=1)
            down = names[f"model.layers.{i}.mlp.experts.down_proj"].get_tensor(f"model.layers.{i}.mlp.experts.down_proj")
            for e in range(gate.shape[0]):
                out[(i, e)] = (gate[e], up[e], down[e])
            continue
        for e in range(EXPERTS):
            p = f"model.layers.{i}.block_sparse_moe.experts.{e}"
            out[(i, e)] = tuple(names[f"{p}.{w}.weight"].get_tensor(f"{p}.{w}.weight") for w in ("w1", "w3", "w2"))
    return out


def same_experts(ours: Path, theirs: Path) -> dict:
    """Every expert's gate, up and down projections in moecli's output equal mergekit's, layer by layer."""
    layers = SHAPE["model.n_layers"]
    a, b = expert_ffns(ours, layers), expert_ffns(theirs, layers)
    mismatched = [f"layer {i} expert {e}" for (i, e) in sorted(a)
                  if (i, e) not in b or any(x.shape != y.shape or not bool((x == y).all())
                                            for x, y in zip(a[(i, e)], b[(i, e)]))]
    return {"experts_compared": len(a), "in_mergekit_output": len(b), "mismatched": mismatched[:5],
            "identical": not mismatched and len(a) == len(b)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--install-mergekit", action="store_true", help=f"install mergekit into {VENV} and exit")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if a.install_mergekit:
        install()
        return
    mk = VENV / "bin" / "mergekit-moe"
    if not mk.exists():
        sys.exit(f"error: {mk} not found: run with --install-mergekit first (installs mergekit into its own venv)")
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        tmp = Path(tmp)
        dense = make_dense(tmp)
        mergekit_config(dense, tmp / "mk.yaml")
        times: dict[str, list] = {"moecli": [], "mergekit": []}
        rss: dict[str, list] = {"moecli": [], "mergekit": []}
        cmds = {"moecli": [sys.executable, "-m", "moecli.cli", "upcycle", str(dense), "-o", str(tmp / "moecli"),
                           "-e", str(EXPERTS), "-k", str(TOP_K), "--format", "mixtral", "--json"],
                "mergekit": [str(mk), str(tmp / "mk.yaml"), str(tmp / "mergekit")]}
        for r in range(a.runs):
            for who in ("moecli", "mergekit") if r % 2 == 0 else ("mergekit", "moecli"):
                subprocess.run(["rm", "-rf", str(tmp / who)], check=True)  # each writes a new directory, untimed
                t, m = run_measured(cmds[who], cwd=ROOT)
                times[who].append(t)
                rss[who].append(m)
        check = same_experts(tmp / "moecli", tmp / "mergekit")
        subprocess.run(["rm", "-rf", str(tmp / "moecli")], check=True)
        verified = json.loads(subprocess.run(cmds["moecli"], capture_output=True, text=True, cwd=ROOT).stdout)
    med = {k: {"seconds": statistics.median(times[k]), "peak_rss_gb": statistics.median(rss[k]) / 1e9}
           for k in times}
    report = {
        "shape": SHAPE, "experts": EXPERTS, "top_k": TOP_K, "runs": a.runs,
        "times_s": times, "peak_rss_bytes": rss, "median": med,
        "time_ratio": med["moecli"]["seconds"] / med["mergekit"]["seconds"],
        "peak_rss_ratio": med["moecli"]["peak_rss_gb"] / med["mergekit"]["peak_rss_gb"],
        "targets": {"time_ratio": 0.7, "peak_rss_ratio": 0.5},
        "moecli_verified_max_abs_logit_diff": verified.get("max_abs_logit_diff"),
        "same_expert_tensors": check,
    }
    emit(report, a.out)


if __name__ == "__main__":
    main()
