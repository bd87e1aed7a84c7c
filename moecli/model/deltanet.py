"""Gated DeltaNet (Qwen3-Next's linear-attention layers): a recurrent state per head instead of a KV cache.

Per token t and value head h, with q, k L2-normalised (q also scaled by 1/sqrt(Dk)), decay g_t <= 0 and write
strength beta_t in (0, 1), the state S (Dk x Dv) follows the gated delta rule:

    S <- exp(g_t) S;   S <- S + beta_t k_t (v_t - S^T k_t)^T;   o_t = S^T q_t

Training and prefill use its chunked parallel form (``chunked``: within a chunk of C tokens the writes are solved
as one unit-lower-triangular system, across chunks the state carries over); decoding one token uses the recurrence
itself (``recurrent``). The two agree (tested). Around it: one projection gives q, k, v and the output gate z per
key head, another the b (beta) and a (decay) logits; q, k, v pass a short causal depthwise conv with SiLU; the output
is RMS-normed per head, times silu(z), and projected out.

Shape legend: B batch, S sequence, Hk / Hv key / value heads (Hv a multiple of Hk), Dk / Dv their dims, C the conv
channels (2 Hk Dk + Hv Dv), K the conv width, L the chunk length.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from moecli.config import ModelConfig


def _l2(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def recurrent(q_BHSK, k_BHSK, v_BHSV, g_BHS, beta_BHS, state_BHKV=None):
    """The gated delta rule one token at a time (q, k already normalised and scaled; fp32). Returns (o_BHSV,
    final state)."""
    B, H, S, Dk = k_BHSK.shape
    Dv = v_BHSV.shape[-1]
    state = k_BHSK.new_zeros(B, H, Dk, Dv) if state_BHKV is None else state_BHKV
    outs = []
    for t in range(S):
        state = state * g_BHS[:, :, t].exp()[..., None, None]
        k_t = k_BHSK[:, :, t]
        err_BHV = v_BHSV[:, :, t] - torch.einsum("bhkv,bhk->bhv", state, k_t)
        state = state + k_t[..., :, None] * (beta_BHS[:, :, t, None] * err_BHV)[..., None, :]
        outs.append(torch.einsum("bhkv,bhk->bhv", state, q_BHSK[:, :, t]))
    return torch.stack(outs, dim=2), state


def chunked(q_BHSK, k_BHSK, v_BHSV, g_BHS, beta_BHS, state_BHKV=None, L: int = 64, r: int = 1):
    """The gated delta rule over chunks of L tokens (the same results as ``recurrent`` to rounding).

    Inside a chunk, with G the running sum of g (log decay since the chunk's start) and D_ij = exp(G_i - G_j) for
    j <= i: the values each token writes, corrected for what the chunk's earlier tokens wrote, solve
    (I + strictly_lower(beta_i k_i.k_j D_ij)) U = beta v, and the part owed to the incoming state W = the same system
    on beta k exp(G). A chunk's outputs are then the incoming state read by q exp(G) plus the in-chunk attention
    (q_i.k_j D_ij, j <= i) on U - W S; the state leaves decayed by the chunk's whole G and plus the chunk's writes.

    ``r`` > 1: q and k are given per key head (H / r of them; value head h reads key head h // r), so the chunk's
    k.k and q.k products are computed once per key head, not once per value head."""
    B, H, S, Dv = v_BHSV.shape
    Dk = k_BHSK.shape[-1]
    pad = -S % L
    if pad:
        q_BHSK, k_BHSK, v_BHSV = (F.pad(x, (0, 0, 0, pad)) for x in (q_BHSK, k_BHSK, v_BHSV))
        g_BHS, beta_BHS = F.pad(g_BHS, (0, pad)), F.pad(beta_BHS, (0, pad))
    N = (S + pad) // L
    q, k = (x.reshape(B, H // r, N, L, Dk) for x in (q_BHSK, k_BHSK))
    v = v_BHSV.reshape(B, H, N, L, Dv)
    beta, G = beta_BHS.reshape(B, H, N, L), g_BHS.reshape(B, H, N, L).cumsum(-1)
    causal_LL = torch.ones(L, L, dtype=torch.bool, device=v.device).tril()
    D = (G[..., :, None] - G[..., None, :]).masked_fill(~causal_LL, float("-inf")).exp()  # B H N L L

    def per_value_head(x):  # B x H/r x ... -> B x H x ... (value head h reads key head h // r)
        return x if r == 1 else x.repeat_interleave(r, dim=1)

    kk = per_value_head(k @ k.transpose(-1, -2))
    q, k = per_value_head(q), per_value_head(k)
    kb = k * beta[..., None]
    system = kk * beta[..., :, None] * D  # its diagonal is ignored: unit lower-triangular
    U = torch.linalg.solve_triangular(system, v * beta[..., None], upper=False, unitriangular=True)
    W = torch.linalg.solve_triangular(system, kb * G.exp()[..., None], upper=False, unitriangular=True)
    attn = (q @ k.transpose(-1, -2)) * D
    q_in = q * G.exp()[..., None]  # reads the incoming state
    k_out = k * (G[..., -1:] - G).exp()[..., None]  # writes, decayed to the chunk's end
    decay_N = G[..., -1].exp()
    state = v.new_zeros(B, H, Dk, Dv) if state_BHKV is None else state_BHKV
    out = []
    # unbound once (not indexed per chunk): the backward then stacks the chunks' gradients in one go instead of
    # writing a whole zero tensor per chunk and slice (measured: 54 of 570 ms of a layer's fwd+bwd went there)
    chunks = zip(*(t.unbind(2) for t in (U, W, q_in, attn, k_out, decay_N[..., None, None])))
    for u_n, w_n, q_n, a_n, k_n, d_n in chunks:
        u = u_n - w_n @ state
        out.append(q_n @ state + a_n @ u)
        state = state * d_n + k_n.transpose(-1, -2) @ u
    o = torch.cat(out, dim=2)[:, :, :S]
    return o, state


class GatedRMSNorm(nn.Module):
    """RMSNorm of each head's output times silu(z) (the norm's weight is a plain scale)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return ((self.weight * xf.to(x.dtype)) * F.silu(z.float())).to(x.dtype)


class GatedDeltaNet(nn.Module):
    """A linear-attention layer (layer type ``linear``); ``forward(x_BSD, cos, sin, kv)`` like attention's (RoPE is
    not used). With kv (model.LayerKV), its ``state`` holds (conv_BCK, state_BHKV) and is updated in place."""

    def __init__(self, cfg: ModelConfig, layer_type: str = "linear"):
        super().__init__()
        self.Hk, self.Hv = cfg.linear_key_heads, cfg.linear_value_heads
        self.Dk, self.Dv = cfg.linear_key_dim, cfg.linear_value_dim
        self.K, self.L = cfg.linear_conv, cfg.linear_chunk
        r = self.Hv // self.Hk
        self.C = 2 * self.Hk * self.Dk + self.Hv * self.Dv
        # per key head: q (Dk), k (Dk), v (r Dv), z (r Dv) side by side; then b (r), a (r)
        self.in_qkvz = nn.Linear(cfg.d_model, self.Hk * (2 * self.Dk + 2 * r * self.Dv), bias=False)
        self.in_ba = nn.Linear(cfg.d_model, self.Hk * 2 * r, bias=False)
        self.conv_C1K = nn.Parameter(torch.empty(self.C, 1, self.K))  # depthwise: one K-tap filter per channel
        nn.init.normal_(self.conv_C1K, std=0.02)
        self.dt_bias_H = nn.Parameter(torch.ones(self.Hv))
        self.A_log_H = nn.Parameter(torch.zeros(self.Hv))
        self.norm = GatedRMSNorm(self.Dv, cfg.norm_eps)
        self.wo = nn.Linear(self.Hv * self.Dv, cfg.d_model, bias=False)

    def kv_shape(self) -> tuple[int, int, int]:
        return 0, 0, 0  # no keys or values: new_cache allocates new_state instead

    def new_state(self, batch: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero conv and recurrent states for ``batch`` rows (dtype and device of ``like``; the recurrent one fp32)."""
        return (like.new_zeros(batch, self.C, self.K - 1),
                like.new_zeros(batch, self.Hv, self.Dk, self.Dv, dtype=torch.float32))

    def forward(self, x_BSD: torch.Tensor, cos=None, sin=None, kv=None) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        Hk, Hv, Dk, Dv, r = self.Hk, self.Hv, self.Dk, self.Dv, self.Hv // self.Hk
        q, k, v, z = self.in_qkvz(x_BSD).view(B, S, Hk, 2 * Dk + 2 * r * Dv).split([Dk, Dk, r * Dv, r * Dv], dim=-1)
        b, a = self.in_ba(x_BSD).view(B, S, Hk, 2 * r).split([r, r], dim=-1)
        mixed_BCS = torch.cat([q.reshape(B, S, -1), k.reshape(B, S, -1), v.reshape(B, S, -1)], dim=-1).transpose(1, 2)
        state = None
        if kv is not None:
            if kv.state is None:
                kv.state = self.new_state(B, x_BSD)
            conv_state, state = kv.state
            padded = torch.cat([conv_state.to(mixed_BCS.dtype), mixed_BCS], dim=-1)
        else:
            padded = F.pad(mixed_BCS, (self.K - 1, 0))
        mixed_BCS = F.silu(F.conv1d(padded, self.conv_C1K, groups=self.C))
        if kv is not None:
            kv.state[0].copy_(padded[..., -(self.K - 1):])
        q, k, v = mixed_BCS.transpose(1, 2).split([Hk * Dk, Hk * Dk, Hv * Dv], dim=-1)
        q, k = (t.reshape(B, S, Hk, Dk) for t in (q, k))
        q, k, v = (t.transpose(1, 2).float() for t in (q, k, v.reshape(B, S, Hv, Dv)))
        q, k = _l2(q) * Dk ** -0.5, _l2(k)  # per key head: repeated to the value heads only where needed
        beta_BHS = torch.sigmoid(b.reshape(B, S, Hv).float()).transpose(1, 2)
        g_BHS = (-self.A_log_H.float().exp() * F.softplus(a.reshape(B, S, Hv).float() + self.dt_bias_H)).transpose(1, 2)
        if S == 1 and state is not None:
            q, k = q.repeat_interleave(r, dim=1), k.repeat_interleave(r, dim=1)
            o, new_state = recurrent(q, k, v, g_BHS, beta_BHS, state)
        else:
            o, new_state = chunked(q, k, v, g_BHS, beta_BHS, state, self.L, r)
        if kv is not None:
            kv.state[1].copy_(new_state)
            kv.n += S
        o_BSHV = self.norm(o.transpose(1, 2).to(x_BSD.dtype), z.reshape(B, S, Hv, Dv))
        return self.wo(o_BSHV.reshape(B, S, Hv * Dv))
