"""Rotary position embeddings and their context-extension variants, in one place.

Every variant is a different set of inverse frequencies ``inv_freq_F`` (F = rotary dims / 2) and, for YaRN, an
attention factor that scales cos and sin (so the attention logits by its square):

    default   theta^(-2i/d)
    linear    default / factor                                     (position interpolation)
    dynamic   default with theta grown by the sequence length past the original context (NTK-aware)
    yarn      per frequency, a ramp between default and default / factor by how many rotations it makes in the
              original context (beta_fast, beta_slow); attention factor 0.1 ln(factor) + 1, or DeepSeek's
              mscale / mscale_all_dim ratio
    llama3    long wavelengths / factor, short ones kept, a smooth ramp between (low/high_freq_factor)

Partial rotary (``rope_partial``): only the first rotary_dim = head_dim x factor dims of each head rotate, the
rest pass through. Numerics follow transformers' modeling_rope_utils, so checkpoints keep their logits.
"""

from __future__ import annotations

import math

import torch

from moecli.errors import UserError
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


def rotary_dim(cfg) -> int:
    """How many of a head's dims rotate: all (partial rotary: a fraction), or MLA's qk_rope_head_dim."""
    return cfg.qk_rope_head_dim if cfg.attention == "mla" else int(cfg.hd * cfg.rope_partial)


def attention_scale(cfg, head_dim: int) -> float:
    """The softmax scale: 1/sqrt(head_dim), times DeepSeek's mscale(factor, mscale_all_dim)^2 under YaRN, which keeps
    attention's entropy as the context grows (transformers applies it to MLA only)."""
    scale = head_dim ** -0.5
    if cfg.rope_type != "default" and cfg.rope_mscale_all_dim:
        scale *= _yarn_mscale(cfg.rope_factor, cfg.rope_mscale_all_dim) ** 2
    return scale


def original_context(cfg) -> int:
    """The context the model was pretrained at, which the scaling variants extend from."""
    return cfg.rope_original_context or cfg.context


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inv_freq(cfg, seq_len: int, device=None) -> tuple[torch.Tensor, float]:
    """(inv_freq_F, attention factor) for a sequence of ``seq_len`` positions (only ``dynamic`` depends on it)."""
    dim, base, f = rotary_dim(cfg), cfg.rope_theta, cfg.rope_factor
    if cfg.rope_type == "dynamic":  # NTK-aware: a larger base once the sequence outgrows the original context
        orig = original_context(cfg)
        L = max(seq_len, orig)
        base = base * ((f * L / orig) - (f - 1)) ** (dim / (dim - 2))
    pos_F = base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim)
    inv_F = 1.0 / pos_F
    scale = 1.0
    if cfg.rope_type == "linear":
        inv_F = inv_F / f
    elif cfg.rope_type == "yarn":
        orig = original_context(cfg)

        def correction_dim(rotations: float) -> float:  # the dim that makes `rotations` turns in the original context
            return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(cfg.rope_beta_fast), correction_dim(cfg.rope_beta_slow)
        if cfg.rope_truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp_F = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
        keep_F = 1 - ramp_F  # 1: extrapolate (the default frequency), 0: interpolate (/ factor)
        inv_F = 1.0 / (f * pos_F) * (1 - keep_F) + inv_F * keep_F
        if cfg.rope_attention_factor:
            scale = cfg.rope_attention_factor
        elif cfg.rope_mscale and cfg.rope_mscale_all_dim:
            scale = _yarn_mscale(f, cfg.rope_mscale) / _yarn_mscale(f, cfg.rope_mscale_all_dim)
        else:
            scale = _yarn_mscale(f)
    elif cfg.rope_type == "llama3":
        orig = original_context(cfg)
        low_wavelen, high_wavelen = orig / cfg.rope_low_freq_factor, orig / cfg.rope_high_freq_factor
        wavelen_F = 2 * math.pi / inv_F
        scaled_F = torch.where(wavelen_F > low_wavelen, inv_F / f, inv_F)
        smooth_F = (orig / wavelen_F - cfg.rope_low_freq_factor) / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
        smoothed_F = (1 - smooth_F) * scaled_F / f + smooth_F * scaled_F
        medium_F = ~(wavelen_F < high_wavelen) * ~(wavelen_F > low_wavelen)
        inv_F = torch.where(medium_F, smoothed_F, scaled_F)
    return inv_F, scale


def cos_sin(cfg, seq_len: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos_SR, sin_SR (R = rotary dims) for positions 0..seq_len-1, the attention factor applied."""
    inv_F, scale = inv_freq(cfg, seq_len, device)
    freqs_SF = torch.outer(torch.arange(seq_len, device=device).float(), inv_F)
    emb_SR = torch.cat([freqs_SF, freqs_SF], dim=-1)
    return emb_SR.cos() * scale, emb_SR.sin() * scale


def apply_rope(x_BHSDh: torch.Tensor, cos_SR: torch.Tensor, sin_SR: torch.Tensor,
               interleave: bool = False) -> torch.Tensor:
    """Rotate the first R dims of each head (rotate-half layout); the rest, if any, pass through. With
    ``interleave`` (DeepSeek's checkpoints, rope_interleave) the pairs are dims (2i, 2i+1): they are gathered to
    the halves layout first, as transformers does, so the output comes out in halves."""
    R = cos_SR.shape[-1]
    x_rot, x_pass = (x_BHSDh, None) if R == x_BHSDh.shape[-1] else (x_BHSDh[..., :R], x_BHSDh[..., R:])
    if interleave:
        x_rot = x_rot.unflatten(-1, (R // 2, 2)).transpose(-1, -2).flatten(-2)
    half = R // 2
    rotated = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
    out = (x_rot * cos_SR + rotated * sin_SR).to(x_BHSDh.dtype)
    return out if x_pass is None else torch.cat([out, x_pass], dim=-1)


def validate(cfg, check) -> None:
    """The rope_* fields of a ModelConfig; ``check(ok, field, message)`` raises the recipe's field error."""
    check(cfg.rope_type in ROPE_TYPES, "rope_type", f"must be one of {', '.join(ROPE_TYPES)}, got {cfg.rope_type!r}")
    check(0 < cfg.rope_partial <= 1, "rope_partial", f"must be in (0, 1], got {cfg.rope_partial}")
    if cfg.attention != "mla":
        check(rotary_dim(cfg) >= 2 and rotary_dim(cfg) % 2 == 0, "rope_partial",
              f"head_dim x rope_partial must be an even number of dims, got {cfg.hd * cfg.rope_partial:g}")
    if cfg.rope_type != "default":
        check(cfg.rope_factor >= 1, "rope_factor", f"must be >= 1 for rope_type {cfg.rope_type}, got {cfg.rope_factor}")
    check(cfg.rope_original_context >= 0, "rope_original_context", f"must be >= 0, got {cfg.rope_original_context}")
    if cfg.rope_type == "llama3":
        check(cfg.rope_high_freq_factor > cfg.rope_low_freq_factor > 0, "rope_high_freq_factor",
              f"must be > rope_low_freq_factor > 0, got {cfg.rope_high_freq_factor} and {cfg.rope_low_freq_factor}")
    if cfg.rope_type == "yarn":
        check(cfg.rope_beta_fast > 0 and cfg.rope_beta_slow > 0, "rope_beta_fast", "beta_fast and beta_slow must be > 0")
    for name in ("rope_attention_factor", "rope_mscale", "rope_mscale_all_dim"):
        check(getattr(cfg, name) >= 0, name, f"must be >= 0, got {getattr(cfg, name)}")


# ---------------------------------------------------------------- Hugging Face configs, both ways

# rope_parameters / rope_scaling key -> ModelConfig field, per variant
_HF_KEYS = {
    "linear": {"factor": "rope_factor"},
    "dynamic": {"factor": "rope_factor"},
    "yarn": {"factor": "rope_factor", "original_max_position_embeddings": "rope_original_context",
             "beta_fast": "rope_beta_fast", "beta_slow": "rope_beta_slow", "truncate": "rope_truncate",
             "attention_factor": "rope_attention_factor", "mscale": "rope_mscale",
             "mscale_all_dim": "rope_mscale_all_dim"},
    "llama3": {"factor": "rope_factor", "original_max_position_embeddings": "rope_original_context",
               "low_freq_factor": "rope_low_freq_factor", "high_freq_factor": "rope_high_freq_factor"},
}
_REQUIRED = {"linear": ("factor",), "dynamic": ("factor",), "yarn": (), "llama3": ("factor", "low_freq_factor",
                                                                                 "high_freq_factor")}


def from_hf(cfg: dict, context: int, source: str) -> dict:
    """The ModelConfig rope fields (and ``context``) of a Hugging Face config: ``rope_parameters`` (transformers 5)
    or ``rope_scaling`` (4.x; it wins where both are given, as in transformers), with ``rope_theta`` and
    ``partial_rotary_factor`` inside or beside it. A variant moecli does not know is bad input naming the key."""
    key = "rope_scaling" if cfg.get("rope_scaling") else "rope_parameters"
    rp = cfg.get(key) or {}
    if not isinstance(rp, dict):
        raise UserError(f"{source}: {key}: expected an object, got {rp!r}")
    if any(isinstance(v, dict) for v in rp.values()):
        raise UserError(f"{source}: {key}: RoPE per layer type is not supported")
    kind = rp.get("rope_type", rp.get("type")) or "default"
    if kind not in ROPE_TYPES:
        raise UserError(f"{source}: {key}.rope_type: {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    out = {"rope_theta": float(rp.get("rope_theta", cfg.get("rope_theta", 10000.0))), "rope_type": kind,
           "rope_partial": float(rp.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) or 1.0),
           "context": context}
    for k in _REQUIRED.get(kind, ()):
        if rp.get(k) is None:
            raise UserError(f"{source}: {key}.{k}: missing (rope_type {kind} needs it)")
    for k, field in _HF_KEYS.get(kind, {}).items():
        if rp.get(k) is not None:
            out[field] = rp[k]
    if kind in ("yarn", "llama3"):  # pretrained at original_max_position_embeddings (transformers' default: the context)
        out["rope_original_context"] = int(rp.get("original_max_position_embeddings")
                                           or cfg.get("original_max_position_embeddings") or context)
        if rp.get("factor") is None:  # yarn's default factor
            out["rope_factor"] = context / out["rope_original_context"]
    if kind == "dynamic":  # NTK scaling starts past max_position_embeddings: the context is the factor times that
        out["rope_original_context"] = context
        out["context"] = int(context * float(rp["factor"]))
    return out


def to_hf(cfg) -> dict:
    """config.json keys for a ModelConfig's RoPE: rope_theta, rope_parameters (transformers 5) and, for a scaling
    variant, the same as rope_scaling (4.x); max_position_embeddings where dynamic scaling changes it."""
    params = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.rope_partial != 1.0:
        params["partial_rotary_factor"] = cfg.rope_partial
    for k, field in _HF_KEYS.get(cfg.rope_type, {}).items():
        v = getattr(cfg, field)
        if field == "rope_original_context":
            v = original_context(cfg)
        if v or field in ("rope_factor", "rope_truncate"):
            params[k] = v
    out = {"rope_theta": cfg.rope_theta, "rope_parameters": params}
    if cfg.rope_type != "default":
        out["rope_scaling"] = dict(params)
    if cfg.rope_type == "dynamic":
        out["max_position_embeddings"] = original_context(cfg)
    return out
