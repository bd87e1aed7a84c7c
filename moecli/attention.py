"""Attention variants, one registry the model picks from (``model.attention`` in a recipe).

    gqa  grouped-query attention (Llama, Mistral, Qwen, GLM): H query heads share Hkv key/value heads; optional
         q/k/v biases, per-head (Qwen3, GLM) or whole-projection (OLMoE) q/k RMSNorm, partial RoPE
    mla  multi-head latent attention (DeepSeek-V2/V3, Kimi K2): keys and values come from one compressed latent
         per token (kv_lora_rank) plus one rope key shared by all heads; queries optionally through a low-rank
         bottleneck (q_lora_rank); per-head dims qk_nope_head_dim + qk_rope_head_dim for q/k, v_head_dim for v

Both take (x_BSD, cos, sin, kv) and return the block's attention output; ``kv`` (model.LayerKV) holds the keys and
values of the tokens before these for incremental decoding. Shape legend as in model.py; L keys (>= S queries).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .rope import apply_rope, attention_scale


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    """Grouped-query attention."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.hd
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.hd, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.hd, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.hd, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.hd, cfg.d_model, bias=False)
        self.q_norm = self.k_norm = None
        self.full_qk_norm = cfg.qk_norm_full
        if cfg.qk_norm or cfg.qk_norm_full:
            self.q_norm = RMSNorm(cfg.hd * (cfg.n_heads if cfg.qk_norm_full else 1), cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.hd * (cfg.n_kv_heads if cfg.qk_norm_full else 1), cfg.norm_eps)

    def kv_shape(self) -> tuple[int, int, int]:
        """(heads, key dim, value dim) of what a KV cache holds per token."""
        return self.n_kv_heads, self.hd, self.hd

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv=None) -> torch.Tensor:
        """With kv (the keys and values of the tokens before these), x's tokens attend to those too, and kv
        is extended with theirs (incremental decoding: KVCache)."""
        B, S, _ = x_BSD.shape
        q, k = self.wq(x_BSD), self.wk(x_BSD)
        if self.full_qk_norm:  # OLMoE: one norm over all heads
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, S, self.n_heads, self.hd)
        k = k.view(B, S, self.n_kv_heads, self.hd)
        v = self.wv(x_BSD).view(B, S, self.n_kv_heads, self.hd)
        if self.q_norm is not None and not self.full_qk_norm:  # Qwen3: per head
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        pad_BL = None
        if kv is not None:
            k, v = kv.extend(k, v)
            pad_BL = kv.pad_mask()
        o_BHSDh = attend(q, k, v, gqa=self.n_heads != self.n_kv_heads, pad_BL=pad_BL)
        return self.wo(o_BHSDh.transpose(1, 2).reshape(B, S, self.n_heads * self.hd))


# Under a CPU bf16 autocast (train.precision bf16-mixed) torch's bf16 attention kernel is slower than its
# fp32 one for short sequences and small heads (causal fwd+bwd, 2 cores, bf16 speed over fp32: 0.37x at
# S=128, Dh=32; 0.57-0.98x at S*Dh = 2^13-2^14; 1.2-1.7x from 2^15 up), so below S*Dh = 2^15 it runs in fp32.
FP32_ATTENTION_BELOW = 2**15


def attend(q_BHSDh, k_BHLDh, v_BHLDh, gqa: bool, pad_BL: torch.Tensor | None = None,
           scale: float | None = None) -> torch.Tensor:
    """Causal attention of S queries over L >= S keys, the queries being the last S positions; in fp32 under
    a CPU autocast when S * Dh < FP32_ATTENTION_BELOW. pad_BL (True: no token there; the queries' own
    positions never are) leaves those keys out, per row. ``scale``: the softmax scale (default 1/sqrt(Dh))."""
    S, Dh = q_BHSDh.shape[-2:]
    L = k_BHLDh.shape[-2]
    if pad_BL is not None:  # B x 1 x S x L: causal, and no empty slot
        mask = dict(attn_mask=torch.ones(S, L, dtype=torch.bool, device=q_BHSDh.device).tril(L - S)
                    & ~pad_BL[:, None, None])
    else:  # SDPA's is_causal aligns the mask to the top-left corner, right only for S == L; one query needs none
        mask = dict(is_causal=True) if S == L else dict(is_causal=False) if S == 1 else dict(
            attn_mask=torch.ones(S, L, dtype=torch.bool, device=q_BHSDh.device).tril(L - S))
    Dv = v_BHLDh.shape[-1]
    if Dv < Dh and mask.get("is_causal"):  # MLA: values narrower than keys would send SDPA to its math path,
        v_BHLDh = F.pad(v_BHLDh, (0, Dh - Dv))  # which holds all S x L scores; zero-padded, its flash kernel runs
    if q_BHSDh.device.type == "cpu" and torch.is_autocast_enabled("cpu") and S * Dh < FP32_ATTENTION_BELOW:
        with torch.autocast("cpu", enabled=False):
            o = F.scaled_dot_product_attention(q_BHSDh.float(), k_BHLDh.float(), v_BHLDh.float(), enable_gqa=gqa,
                                               scale=scale, **mask)
    else:
        o = F.scaled_dot_product_attention(q_BHSDh, k_BHLDh, v_BHLDh, enable_gqa=gqa, scale=scale, **mask)
    return o[..., :Dv] if o.shape[-1] != Dv else o


# DeepSeek's latent RMSNorms (q_a_layernorm, kv_a_layernorm) keep their own epsilon, not the config's rms_norm_eps
LATENT_NORM_EPS = 1e-6


class MLAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3). Per token:

        q_BSHQ     = wq(x), or wq_b(q_norm(wq_a(x)))          Q = qk_nope_head_dim + qk_rope_head_dim
        c_BSC, kr  = split(wkv_a(x), [C, R])                  C = kv_lora_rank, R = qk_rope_head_dim
        k_nope, v  = split(wkv_b(kv_norm(c)), [N, Dv]) per head
        k          = cat(k_nope, rope(kr) shared by all heads),  q = cat(q_nope, rope(q_rot))

    The KV cache holds the expanded keys and values (what SDPA takes), not the latent: the same tokens as
    transformers' latent cache, at H x (Q + Dv) instead of C + R numbers per token and layer.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, N, R, Dv, C = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        self.n_heads, self.nope, self.rope_dim, self.v_dim, self.kv_rank = H, N, R, Dv, C
        self.interleave = cfg.rope_interleave
        bias = cfg.qkv_bias  # attention_bias: on q_a, kv_a and o
        if cfg.q_lora_rank:
            self.wq_a = nn.Linear(cfg.d_model, cfg.q_lora_rank, bias=bias)
            self.q_norm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.wq_b = nn.Linear(cfg.q_lora_rank, H * (N + R), bias=False)
        else:
            self.wq = nn.Linear(cfg.d_model, H * (N + R), bias=False)
        self.wkv_a = nn.Linear(cfg.d_model, C + R, bias=bias)
        self.kv_norm = RMSNorm(C, LATENT_NORM_EPS)
        self.wkv_b = nn.Linear(C, H * (N + Dv), bias=False)
        self.wo = nn.Linear(H * Dv, cfg.d_model, bias=bias)
        self.scale = attention_scale(cfg, N + R)

    def kv_shape(self) -> tuple[int, int, int]:
        return self.n_heads, self.nope + self.rope_dim, self.v_dim

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv=None) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        H, N, R = self.n_heads, self.nope, self.rope_dim
        q = self.wq(x_BSD) if hasattr(self, "wq") else self.wq_b(self.q_norm(self.wq_a(x_BSD)))
        q_nope, q_rot = q.view(B, S, H, N + R).transpose(1, 2).split([N, R], dim=-1)
        c_BSC, k_rot = self.wkv_a(x_BSD).split([self.kv_rank, R], dim=-1)
        k_nope, v = self.wkv_b(self.kv_norm(c_BSC)).view(B, S, H, N + self.v_dim).transpose(1, 2).split(
            [N, self.v_dim], dim=-1)
        q_rot = apply_rope(q_rot, cos, sin, self.interleave)
        k_rot = apply_rope(k_rot.view(B, 1, S, R), cos, sin, self.interleave)
        q = torch.cat([q_nope, q_rot], dim=-1)
        k = torch.cat([k_nope, k_rot.expand(B, H, S, R)], dim=-1)
        pad_BL = None
        if kv is not None:
            k, v = kv.extend(k, v)
            pad_BL = kv.pad_mask()
        o_BHSDv = attend(q, k, v, gqa=False, pad_BL=pad_BL, scale=self.scale)
        return self.wo(o_BHSDv.transpose(1, 2).reshape(B, S, H * self.v_dim))


ATTENTION = {"gqa": Attention, "mla": MLAttention}
