"""RMSNorm: the norm of every block (pre-attention, pre-FFN, final, q/k norms)."""

from __future__ import annotations

import torch
import torch.nn as nn


class _RMSNormFn(torch.autograd.Function):
    """weight * x / rms(x) for float32 x and weight, the same ops as RMSNorm.forward's; the backward keeps x and
    1/rms(x) and recomputes x / rms(x), where autograd would keep that normalised copy too (one T x D tensor per
    norm less: 137 MiB at the 692M-parameter shape of benchmarks/train_real_shape.py)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, r)
        return weight * (x * r)

    @staticmethod
    def backward(ctx, g):
        x, weight, r = ctx.saved_tensors
        xn = x * r
        gw = (g * xn).reshape(-1, xn.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        gn = g * weight
        gx = r * (gn - xn * (gn * xn).mean(-1, keepdim=True))
        return gx, gw, None


class RMSNorm(nn.Module):
    """x / rms(x) times weight; ``zero_centered`` (Qwen3-Next): times (1 + weight), in fp32, the weight starting
    at 0."""

    def __init__(self, dim: int, eps: float, zero_centered: bool = False):
        super().__init__()
        self.eps, self.zero_centered = eps, zero_centered
        self.weight = nn.Parameter(torch.zeros(dim) if zero_centered else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dtype == self.weight.dtype == torch.float32 and not self.zero_centered and torch.is_grad_enabled()
                and (x.requires_grad or self.weight.requires_grad)):
            return _RMSNormFn.apply(x, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.zero_centered:
            return (xf * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * xf.to(x.dtype)
