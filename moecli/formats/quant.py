"""Quantized Hugging Face checkpoints, dequantized per tensor as they are read.

    fp8    quantization_config.quant_method "fp8" (DeepSeek-V3, Kimi K2, Qwen3 FP8): a float8_e4m3fn ``X.weight``
           with ``X.weight_scale_inv``, one float per weight_block_size block (usually 128 x 128; the last
           blocks of a dim that is not a multiple are partial): weight = fp8 x scale_inv of its block
    mxfp4  quant_method "mxfp4" (GPT-OSS's experts): ``X_blocks`` uint8 (..., G, 16), two FP4 e2m1 values a byte
           (the low nibble first), 32 a block, with ``X_scales`` uint8 (..., G) E8M0 exponents:
           value = fp4 x 2^(scale - 127); a block row of G x 32 values is the last dim of the weight

Tensors that are not quantized are read as they are.
"""

from __future__ import annotations

import torch

from moecli.errors import UserError
METHODS = ("fp8", "mxfp4")
FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def fp8_dequant(w_RC: torch.Tensor, scale_inv_rc: torch.Tensor, block: tuple[int, int], dtype) -> torch.Tensor:
    """A block-scaled float8 weight (R x C) and its scales (ceil(R / br) x ceil(C / bc)) -> R x C in dtype."""
    R, C = w_RC.shape
    br, bc = block
    s = scale_inv_rc.float().repeat_interleave(br, 0)[:R].repeat_interleave(bc, 1)[:, :C]
    return (w_RC.float() * s).to(dtype)


def mxfp4_dequant(blocks: torch.Tensor, scales: torch.Tensor, dtype) -> torch.Tensor:
    """(..., G, 16) uint8 FP4 pairs and (..., G) uint8 E8M0 exponents -> (..., G * 32) in dtype."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not match")
    lut = torch.tensor(FP4_E2M1, dtype=torch.float32)
    b = blocks.to(torch.uint8)
    vals = torch.stack([lut[(b & 0x0F).long()], lut[(b >> 4).long()]], dim=-1).flatten(-2)  # (..., G, 32)
    out = torch.ldexp(vals, (scales.to(torch.int32) - 127).unsqueeze(-1).float())
    return out.flatten(-2).to(dtype)


def method(cfg: dict, source: str) -> str | None:
    """The config's quantization method (None: not quantized); one moecli cannot read is bad input."""
    q = cfg.get("quantization_config")
    if not q:
        return None
    m = q.get("quant_method") if isinstance(q, dict) else None
    if m not in METHODS:
        raise UserError(f"{source}: quantization_config.quant_method: {m!r} is not supported "
                        f"(read: {', '.join(METHODS)})")
    if m == "fp8":
        bs = q.get("weight_block_size") or [128, 128]
        if not (isinstance(bs, list) and len(bs) == 2 and all(isinstance(v, int) and v >= 1 for v in bs)):
            raise UserError(f"{source}: quantization_config.weight_block_size: expected two block sizes, got {bs!r}")
        if q.get("activation_scheme", "dynamic") not in ("dynamic", None):
            raise UserError(f"{source}: quantization_config.activation_scheme: only dynamic is supported")
    return m
