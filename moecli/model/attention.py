"""Attention variants, one registry the model picks from (``model.attention`` in a recipe).

    gqa  grouped-query attention (Llama, Mistral, Qwen, GLM, GPT-OSS, Llama 4): H query heads share Hkv key/value
         heads; optional q/k/v (and o) biases, per-head (Qwen3, GLM) or whole-projection (OLMoE) q/k RMSNorm,
         partial RoPE; per layer (model.layer_types) full, sliding-window (GPT-OSS), chunked (Llama 4) or NoPE
         (Llama 4: no RoPE, temperature-tuned queries); attention sinks (GPT-OSS); L2 q/k norm (Llama 4)
    mla  multi-head latent attention (DeepSeek-V2/V3, Kimi K2): keys and values come from one compressed latent
         per token (kv_lora_rank) plus one rope key shared by all heads; queries optionally through a low-rank
         bottleneck (q_lora_rank); per-head dims qk_nope_head_dim + qk_rope_head_dim for q/k, v_head_dim for v

Each is built from (ModelConfig, the layer's type) and takes (x_BSD, cos, sin, kv) and returns the block's attention
output; ``kv`` (transformer.LayerKV) holds the keys and values of the tokens before these for incremental decoding.
Shape legend as in docs/internals.md: L keys (>= S queries), Dc MLA's latent width.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from moecli.config import ModelConfig
from moecli.model.deltanet import GatedDeltaNet
from moecli.model.norm import RMSNorm
from moecli.model.rope import apply_rope, attention_scale


class Attention(nn.Module):
    """Grouped-query attention; ``layer_type`` (ModelConfig.layer_type) picks which keys each query sees:
    full (all before it), sliding (the last sliding_window), chunked (those in its attention_chunk), nope (full,
    without RoPE)."""

    def __init__(self, cfg: ModelConfig, layer_type: str = "full"):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.hd
        self.gated = cfg.attention_gate  # Qwen3-Next: wq gives each head's query and output gate side by side
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.hd * (2 if self.gated else 1), bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.hd, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.hd, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.hd, cfg.d_model, bias=cfg.o_bias)
        self.q_norm = self.k_norm = None
        self.full_qk_norm = cfg.qk_norm_full
        if cfg.qk_norm or cfg.qk_norm_full:
            self.q_norm = RMSNorm(cfg.hd * (cfg.n_heads if cfg.qk_norm_full else 1), cfg.norm_eps, cfg.norm_zero_centered)
            self.k_norm = RMSNorm(cfg.hd * (cfg.n_kv_heads if cfg.qk_norm_full else 1), cfg.norm_eps,
                                  cfg.norm_zero_centered)
        self.layer_type = layer_type
        self.interleave = cfg.rope_interleave
        self.use_rope = layer_type != "nope"
        self.window = cfg.sliding_window if layer_type == "sliding" else 0
        self.chunk = cfg.attention_chunk if layer_type == "chunked" else 0
        self.l2_eps = cfg.norm_eps if cfg.qk_l2_norm and self.use_rope else 0.0  # 0: no L2 norm
        self.temperature = (cfg.temperature_floor, cfg.temperature_scale) \
            if not self.use_rope and cfg.temperature_floor else None
        self.sinks_H = nn.Parameter(torch.zeros(cfg.n_heads)) if cfg.attention_sinks else None

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
        gate_BSX = None
        if self.gated:
            q, gate_BSX = q.view(B, S, self.n_heads, 2 * self.hd).chunk(2, dim=-1)
            gate_BSX = gate_BSX.reshape(B, S, self.n_heads * self.hd)
        q = q.reshape(B, S, self.n_heads, self.hd)
        k = k.view(B, S, self.n_kv_heads, self.hd)
        v = self.wv(x_BSD).view(B, S, self.n_kv_heads, self.hd)
        if self.q_norm is not None and not self.full_qk_norm:  # Qwen3: per head
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.use_rope:
            q, k = apply_rope(q, cos, sin, self.interleave), apply_rope(k, cos, sin, self.interleave)
        if self.l2_eps:  # Llama 4
            q, k = l2_norm(q, self.l2_eps), l2_norm(k, self.l2_eps)
        pos0 = 0 if kv is None else kv.n  # the first query's position (cache slot)
        if self.temperature is not None:
            floor, scale = self.temperature
            pos_S = torch.arange(pos0, pos0 + S, device=q.device, dtype=torch.float32)
            q = (q * (torch.log1p(torch.floor((pos_S + 1) / floor)) * scale + 1)[:, None]).to(q.dtype)
        pad_BL, k_pos0 = None, 0
        if kv is not None:
            k_pos0 = kv.start
            k, v = kv.extend(k, v)
            pad_BL = kv.pad_mask()
        o_BHSDh = attend(q, k, v, gqa=self.n_heads != self.n_kv_heads, pad_BL=pad_BL, window=self.window,
                         chunk=self.chunk, sinks_H=self.sinks_H, k_pos0=k_pos0)
        o_BSX = o_BHSDh.transpose(1, 2).reshape(B, S, self.n_heads * self.hd)
        return self.wo(o_BSX if gate_BSX is None else o_BSX * torch.sigmoid(gate_BSX))


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dim, in fp32, without a weight (Llama 4's q/k norm)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


# Under a CPU bf16 autocast (train.precision bf16-mixed) torch's bf16 attention kernel is slower than its
# fp32 one for short sequences and small heads (causal fwd+bwd, 2 cores, bf16 speed over fp32: 0.37x at
# S=128, Dh=32; 0.57-0.98x at S*Dh = 2^13-2^14; 1.2-1.7x from 2^15 up), so below S*Dh = 2^15 it runs in fp32.
FP32_ATTENTION_BELOW = 2**15


def attend(q_BHSDh, k_BHLDh, v_BHLDh, gqa: bool, pad_BL: torch.Tensor | None = None,
           scale: float | None = None, window: int = 0, chunk: int = 0, sinks_H: torch.Tensor | None = None,
           k_pos0: int = 0) -> torch.Tensor:
    """Causal attention of S queries over L >= S keys, the queries being the last S positions; in fp32 under
    a CPU autocast when S * Dh < FP32_ATTENTION_BELOW. pad_BL (True: no token there; the queries' own
    positions never are) leaves those keys out, per row. ``scale``: the softmax scale (default 1/sqrt(Dh)).
    ``window`` > 0: each query sees only the last ``window`` positions (itself included); ``chunk`` > 0: only
    positions in its own chunk of that many (positions count from k_pos0, the first key's); ``sinks_H``: one more
    logit per query head in each softmax's denominator, attending to nothing (GPT-OSS)."""
    if window or chunk or sinks_H is not None:
        q_BHSDh, k_BHLDh, v_BHLDh, mask, scale, Dv = _local_and_sinks(q_BHSDh, k_BHLDh, v_BHLDh, pad_BL, scale,
                                                                      window, chunk, sinks_H, k_pos0)
        return _sdpa(q_BHSDh, k_BHLDh, v_BHLDh, gqa, scale, dict(attn_mask=mask))[..., :Dv]
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
    o = _sdpa(q_BHSDh, k_BHLDh, v_BHLDh, gqa, scale, mask)
    return o[..., :Dv] if o.shape[-1] != Dv else o


def _sdpa(q_BHSDh, k_BHLDh, v_BHLDh, gqa: bool, scale, mask: dict) -> torch.Tensor:
    S, Dh = q_BHSDh.shape[-2:]
    if q_BHSDh.device.type == "cpu" and torch.is_autocast_enabled("cpu") and S * Dh < FP32_ATTENTION_BELOW:
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q_BHSDh.float(), k_BHLDh.float(), v_BHLDh.float(), enable_gqa=gqa,
                                                  scale=scale, **mask)
    return F.scaled_dot_product_attention(q_BHSDh, k_BHLDh, v_BHLDh, enable_gqa=gqa, scale=scale, **mask)


def _local_and_sinks(q_BHSDh, k_BHLDh, v_BHLDh, pad_BL, scale, window: int, chunk: int, sinks_H, k_pos0: int):
    """attend's inputs for sliding-window or chunked attention and sinks, as one masked SDPA call that its flash
    kernel runs: (q, k, v, mask, scale, Dv).

    Keys no query can see (before the first query's window or chunk) are cut off first, so a decoding step
    attends over at most a window or chunk of the cache, however long the sequence. A sink is one more key
    that every query sees: the queries get one more dim holding sink_h / scale, the keys 0 there and the sink key
    1, so its score is exactly head h's sink logit; its value is zero (v is zero-padded to q's width, which the
    flash kernel needs)."""
    B, H, S, Dh = q_BHSDh.shape
    L, Dv = k_BHLDh.shape[-2], v_BHLDh.shape[-1]
    q_pos0 = k_pos0 + L - S
    lo = 0
    if window:
        lo = max(lo, q_pos0 - window + 1)
    if chunk:
        lo = max(lo, q_pos0 // chunk * chunk)
    cut = min(max(0, lo - k_pos0), L - S)
    if cut:
        k_BHLDh, v_BHLDh, L, k_pos0 = k_BHLDh[..., cut:, :], v_BHLDh[..., cut:, :], L - cut, k_pos0 + cut
        pad_BL = None if pad_BL is None else pad_BL[:, cut:]
    dev = q_BHSDh.device
    qp_S1 = torch.arange(q_pos0, q_pos0 + S, device=dev)[:, None]
    kp_1L = torch.arange(k_pos0, k_pos0 + L, device=dev)[None]
    mask = kp_1L <= qp_S1
    if window:
        mask = mask & (kp_1L > qp_S1 - window)
    if chunk:
        mask = mask & (kp_1L // chunk == qp_S1 // chunk)
    if pad_BL is not None:
        mask = mask & ~pad_BL[:, None, None]
    if sinks_H is not None:
        scale = scale or Dh ** -0.5
        Hkv = k_BHLDh.shape[1]
        sink_q = (sinks_H.to(q_BHSDh.dtype) / scale).view(1, H, 1, 1).expand(B, H, S, 1)
        q_BHSDh = torch.cat([q_BHSDh, sink_q], dim=-1)
        sink_k = k_BHLDh.new_zeros(B, Hkv, 1, Dh + 1)
        sink_k[..., -1] = 1
        k_BHLDh = torch.cat([sink_k, F.pad(k_BHLDh, (0, 1))], dim=2)
        v_BHLDh = F.pad(v_BHLDh, (0, Dh + 1 - Dv, 1, 0))
        mask = torch.cat([mask.new_ones(*mask.shape[:-1], 1), mask], dim=-1)
    elif Dv != Dh:
        v_BHLDh = F.pad(v_BHLDh, (0, Dh - Dv))
    return q_BHSDh, k_BHLDh, v_BHLDh, mask, scale, Dv


# DeepSeek's latent RMSNorms (q_a_layernorm, kv_a_layernorm) keep their own epsilon, not the config's rms_norm_eps
LATENT_NORM_EPS = 1e-6


class MLAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3). Per token:

        q_BSHQ     = wq(x), or wq_b(q_norm(wq_a(x)))          Q = qk_nope_head_dim + qk_rope_head_dim
        c_BSDc, kr = split(wkv_a(x), [Dc, R])               Dc = kv_lora_rank, R = qk_rope_head_dim
        k_nope, v  = split(wkv_b(kv_norm(c)), [N, Dv]) per head
        k          = cat(k_nope, rope(kr) shared by all heads),  q = cat(q_nope, rope(q_rot))

    The KV cache holds the expanded keys and values (what SDPA takes), not the latent: the same tokens as
    transformers' latent cache, at H x (Q + Dv) instead of C + R numbers per token and layer.
    """

    def __init__(self, cfg: ModelConfig, layer_type: str = "full"):
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
        c_BSDc, k_rot = self.wkv_a(x_BSD).split([self.kv_rank, R], dim=-1)
        k_nope, v = self.wkv_b(self.kv_norm(c_BSDc)).view(B, S, H, N + self.v_dim).transpose(1, 2).split(
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


def make_attention(cfg: ModelConfig, layer_type: str) -> nn.Module:
    """Layer's token mixer: Gated DeltaNet for a linear layer (deltanet.py), else the recipe's attention."""
    if layer_type == "linear":
        return GatedDeltaNet(cfg)
    return ATTENTION[cfg.attention](cfg, layer_type)
