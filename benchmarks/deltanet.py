"""Gated DeltaNet: moecli's layer (deltanet.GatedDeltaNet) vs transformers' Qwen3NextGatedDeltaNet on its torch
fallback (what runs without flash-linear-attention, as on a CPU), forward + backward, in the same run; and cached
decoding per token against re-running the window.

    python benchmarks/deltanet.py [--repeats 9] [--tokens 2048] [--out benchmarks/results/deltanet.json]

Both get the same weights (moecli's copied into transformers' module) and input; they alternate, each ratio is
transformers' time over moecli's (> 1: moecli faster), paired per repeat and of medians. Shape: Qwen3-Next's linear
layer scaled to a CPU (d=1024, 4 key heads / 8 value heads of 64, conv 4, chunks of 64), 2 x 1024 tokens, fp32.
Target: >= 1.0x. Needs transformers (the `test` extra).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_common import alternate, emit, layer_args  # noqa: E402

from moecli.config import ModelConfig  # noqa: E402
from moecli.model.deltanet import GatedDeltaNet  # noqa: E402
from moecli.model.transformer import LayerKV  # noqa: E402

SHAPE = dict(d_model=1024, n_heads=8, n_kv_heads=8, layer_types=["linear"], linear_key_heads=4, linear_value_heads=8,
             linear_key_dim=64, linear_value_dim=64, linear_conv=4, linear_chunk=64, norm_eps=1e-6)


def hf_layer(ours: GatedDeltaNet):
    import transformers
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

    c = SHAPE
    hc = transformers.Qwen3NextConfig(hidden_size=c["d_model"], linear_num_key_heads=c["linear_key_heads"],
                                      linear_num_value_heads=c["linear_value_heads"],
                                      linear_key_head_dim=c["linear_key_dim"], linear_value_head_dim=c["linear_value_dim"],
                                      linear_conv_kernel_dim=c["linear_conv"], num_hidden_layers=1,
                                      layer_types=["linear_attention"], rms_norm_eps=c["norm_eps"])
    theirs = Qwen3NextGatedDeltaNet(hc, 0)
    with torch.no_grad():
        for mine, name in ((ours.in_qkvz.weight, "in_proj_qkvz.weight"), (ours.in_ba.weight, "in_proj_ba.weight"),
                           (ours.conv_C1K, "conv1d.weight"), (ours.dt_bias_H, "dt_bias"), (ours.A_log_H, "A_log"),
                           (ours.norm.weight, "norm.weight"), (ours.wo.weight, "out_proj.weight")):
            theirs.get_parameter(name).copy_(mine)
    return theirs


def train_step(repeats: int, tokens: int) -> dict:
    torch.manual_seed(0)
    ours = GatedDeltaNet(ModelConfig(**SHAPE))
    with torch.no_grad():
        ours.A_log_H.uniform_(-1, 1)
        ours.dt_bias_H.uniform_(0.5, 1.5)
    theirs = hf_layer(ours)
    B, S = 2, tokens // 2
    x = torch.randn(B, S, SHAPE["d_model"], requires_grad=True)

    def run_ours():
        ours(x).sum().backward()

    def run_theirs():
        theirs(x).sum().backward()

    with torch.no_grad():
        a, b = ours(x), theirs(x)
        diff = float((a - b).abs().max() / b.abs().max())
    return {"batch": B, "seq": S, "max_rel_diff": diff, **alternate(run_ours, run_theirs, repeats)}


@torch.no_grad()
def decode(prefix: int = 512, steps: int = 32) -> dict:
    """ms per generated token: the recurrent step on the cached states vs re-running the whole window."""
    torch.manual_seed(0)
    layer = GatedDeltaNet(ModelConfig(**SHAPE)).eval()
    x = torch.randn(1, prefix + steps, SHAPE["d_model"])
    kv = LayerKV(prefix + steps)
    layer(x[:, :prefix], kv=kv)
    t0 = time.perf_counter()
    for t in range(prefix, prefix + steps):
        layer(x[:, t: t + 1], kv=kv)
    cached = (time.perf_counter() - t0) / steps
    t0 = time.perf_counter()
    for t in range(prefix, prefix + 4):
        layer(x[:, : t + 1])
    rerun = (time.perf_counter() - t0) / 4
    return {"prefix": prefix, "cached_ms_per_token": 1e3 * cached, "rerun_ms_per_token": 1e3 * rerun,
            "speedup": rerun / cached}


def main() -> None:
    a = layer_args(__doc__)
    import transformers

    res = {"torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
           "shape": SHAPE, "train_step": train_step(a.repeats, a.tokens), "decode": decode()}
    emit(res, a.out)


if __name__ == "__main__":
    main()
