"""Attention with sinks and a sliding window: moecli's GQA Attention vs transformers' GptOssAttention (eager, the
implementation GPT-OSS runs on a CPU), forward + backward, in the same run.

    python benchmarks/sink_attention.py [--repeats 9] [--tokens 2048] [--out benchmarks/results/sink_attention.json]

Both get the same weights (moecli's copied into transformers' module, sinks and biases non-zero) and the same input;
they alternate, and each ratio is transformers' time over moecli's (> 1: moecli faster), paired per repeat and of
medians. Shape: GPT-OSS's attention scaled to a CPU (d=1024, 16 query / 4 key-value heads of 64, q/k/v/o biases,
sinks), a sliding_attention layer (window 128) and a full_attention one, 2 x 1024 tokens, fp32. Target: >= 1.0x.
Needs transformers (the `test` extra).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_common import alternate, emit, layer_args  # noqa: E402

from moecli.model.attention import Attention  # noqa: E402
from moecli.config import ModelConfig  # noqa: E402
from moecli.model.rope import cos_sin  # noqa: E402

SHAPE = dict(d_model=1024, n_heads=16, n_kv_heads=4, head_dim=64, context=4096, qkv_bias=True, o_bias=True,
             attention_sinks=True, layer_types=["sliding", "full"], sliding_window=128)


def hf_attention(cfg: ModelConfig, ours: Attention, layer: int):
    import transformers
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssAttention, GptOssRotaryEmbedding

    hc = transformers.GptOssConfig(hidden_size=cfg.d_model, num_attention_heads=cfg.n_heads,
                                   num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.hd, num_hidden_layers=2,
                                   sliding_window=cfg.sliding_window, max_position_embeddings=cfg.context,
                                   rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
    hc._attn_implementation = "eager"
    theirs = GptOssAttention(hc, layer_idx=layer)
    with torch.no_grad():
        for mine, name in ((ours.wq, "q_proj"), (ours.wk, "k_proj"), (ours.wv, "v_proj"), (ours.wo, "o_proj")):
            getattr(theirs, name).weight.copy_(mine.weight)
            getattr(theirs, name).bias.copy_(mine.bias)
        theirs.sinks.copy_(ours.sinks_H)
    return theirs, GptOssRotaryEmbedding(hc)


def additive_mask(S: int, window: int) -> torch.Tensor:
    """The 1 x 1 x S x S float mask transformers' eager attention adds: 0 where a query sees a key, the dtype's min
    elsewhere (causal, and within the window for a sliding layer)."""
    q, k = torch.arange(S)[:, None], torch.arange(S)[None]
    ok = (k <= q) & ((k > q - window) if window else True)
    return torch.where(ok, 0.0, torch.finfo(torch.float32).min)[None, None]


def ratio(layer_type: str, repeats: int, tokens: int) -> dict:
    torch.manual_seed(0)
    cfg = ModelConfig(**SHAPE)
    ours = Attention(cfg, layer_type)
    with torch.no_grad():
        for lin in (ours.wq, ours.wk, ours.wv, ours.wo):
            lin.bias.normal_(0, 0.1)
        ours.sinks_H.normal_(0, 1.0)
    theirs, rotary = hf_attention(cfg, ours, 0 if layer_type == "sliding" else 1)
    B, S = 2, tokens // 2
    x = torch.randn(B, S, cfg.d_model, requires_grad=True)
    cos, sin = cos_sin(cfg, S)
    hf_cs = rotary(x, torch.arange(S)[None].expand(B, S))
    mask = additive_mask(S, cfg.sliding_window if layer_type == "sliding" else 0)

    def run_ours():
        ours(x, cos, sin).sum().backward()

    def run_theirs():
        theirs(x, hf_cs, mask)[0].sum().backward()

    with torch.no_grad():
        a, b = ours(x, cos, sin), theirs(x, hf_cs, mask)[0]
        diff = float((a - b).abs().max() / b.abs().max())
    return {"layer_type": layer_type, "batch": B, "seq": S, "max_rel_diff": diff,
            **alternate(run_ours, run_theirs, repeats)}


def main() -> None:
    a = layer_args(__doc__)
    import transformers

    res = {"torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
           "shape": SHAPE, "layers": [ratio(t, a.repeats, a.tokens) for t in ("sliding", "full")]}
    emit(res, a.out)


if __name__ == "__main__":
    main()
