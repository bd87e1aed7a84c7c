"""Multi-head latent attention: moecli's MLAttention vs transformers' DeepseekV3Attention, forward + backward, and
cached decoding per token against GQA at equal heads.

    python benchmarks/mla_attention.py [--repeats 9] [--tokens 2048] [--out benchmarks/results/mla_attention.json]

Both attentions get the same weights (moecli's copied into transformers' module) and the same input; they
alternate, and each ratio is transformers' time over moecli's (> 1: moecli faster), paired per repeat and of
medians. Shape: DeepSeek-V2-Lite's attention scaled to a CPU (d=1024, 16 heads, kv_lora_rank 256, nope 64,
rope 32, v 64, no q LoRA), 2 x 1024 tokens, fp32. Target: >= 1.0x.

Decoding: one token at a time after a 512-token prefix, MLA's cache (expanded keys and values) against a GQA
layer with the same 16 heads (key/value heads 16, head dim 64), the median per-token time of each.
Needs transformers (the `test` extra); without it only the decoding part runs.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_common import alternate, emit, layer_args  # noqa: E402

from moecli.model.attention import Attention, MLAttention  # noqa: E402
from moecli.config import ModelConfig  # noqa: E402
from moecli.model.transformer import LayerKV  # noqa: E402
from moecli.model.rope import cos_sin  # noqa: E402

MLA = dict(d_model=1024, n_heads=16, n_kv_heads=16, context=4096, attention="mla", q_lora_rank=0, kv_lora_rank=256,
           qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, rope_interleave=True)


def hf_attention(cfg: ModelConfig, ours: MLAttention):
    """transformers' DeepseekV3Attention with moecli's weights, sdpa as its models use by default."""
    import transformers
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

    hc = transformers.DeepseekV3Config(hidden_size=cfg.d_model, num_attention_heads=cfg.n_heads,
                                       num_key_value_heads=cfg.n_heads, q_lora_rank=None,
                                       kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
                                       qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
                                       rope_interleave=True, max_position_embeddings=cfg.context)
    hc._attn_implementation = "sdpa"
    theirs = DeepseekV3Attention(hc, layer_idx=0)
    with torch.no_grad():
        for mine, name in ((ours.wq, "q_proj"), (ours.wkv_a, "kv_a_proj_with_mqa"), (ours.kv_norm, "kv_a_layernorm"),
                           (ours.wkv_b, "kv_b_proj"), (ours.wo, "o_proj")):
            getattr(theirs, name).weight.copy_(mine.weight)
    return theirs, DeepseekV3RotaryEmbedding(hc)


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def train_step_ratio(repeats: int, tokens: int) -> dict:
    torch.manual_seed(0)
    cfg = ModelConfig(**MLA)
    ours = MLAttention(cfg)
    theirs, rotary = hf_attention(cfg, ours)
    B, S = 2, tokens // 2
    x = torch.randn(B, S, cfg.d_model, requires_grad=True)
    cos, sin = cos_sin(cfg, S)
    pos = torch.arange(S)[None].expand(B, S)
    hf_cos, hf_sin = rotary(x, pos)
    mask = None  # sdpa's own causal path (is_causal) for a full causal sequence

    def run_ours():
        ours(x, cos, sin).sum().backward()

    def run_theirs():
        theirs(x, (hf_cos, hf_sin), mask)[0].sum().backward()

    with torch.no_grad():  # the same function (a causal mask where transformers' sdpa takes none: it is_causal)
        a = ours(x, cos, sin)
        b = theirs(x, (hf_cos, hf_sin), mask)[0]
        diff = float((a - b).abs().max() / b.abs().max())
    return {"shape": {"batch": B, "seq": S, **MLA}, "max_rel_diff": diff, **alternate(run_ours, run_theirs, repeats)}


@torch.no_grad()
def decode_per_token(repeats: int, prefix: int = 512, steps: int = 64) -> dict:
    torch.manual_seed(0)
    out = {}
    for name, cfg in (("mla", ModelConfig(**MLA)),
                      ("gqa", ModelConfig(d_model=1024, n_heads=16, n_kv_heads=16, context=4096))):
        layer = (MLAttention if name == "mla" else Attention)(cfg).eval()
        cos, sin = cos_sin(cfg, prefix + steps)
        times = []
        for _ in range(repeats):
            kv = LayerKV(prefix + steps)
            layer(torch.randn(1, prefix, cfg.d_model), cos[:prefix], sin[:prefix], kv)
            t0 = time.perf_counter()
            for t in range(prefix, prefix + steps):
                layer(torch.randn(1, 1, cfg.d_model), cos[t: t + 1], sin[t: t + 1], kv)
            times.append((time.perf_counter() - t0) / steps)
        H, Dk, Dv = layer.kv_shape()
        out[name] = {"ms_per_token_median": 1e3 * statistics.median(times), "cache_floats_per_token": H * (Dk + Dv)}
    out["mla_over_gqa"] = out["mla"]["ms_per_token_median"] / out["gqa"]["ms_per_token_median"]
    out["latent_floats_per_token"] = MLA["kv_lora_rank"] + MLA["qk_rope_head_dim"]
    return out


def main() -> None:
    a = layer_args(__doc__)
    res = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    try:
        import transformers

        res["transformers"] = transformers.__version__
        res["train_step"] = train_step_ratio(a.repeats, a.tokens)
    except ImportError:
        res["train_step"] = "skipped: transformers is not installed (pip install -e '.[test]')"
    res["decode"] = decode_per_token(a.repeats)
    emit(res, a.out)


if __name__ == "__main__":
    main()
