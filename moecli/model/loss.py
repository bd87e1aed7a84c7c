"""The training loss of the output head: cross-entropy over the vocabulary, in chunks of tokens.

Shape legend: T tokens, D model dim, V vocabulary, C one chunk's tokens.

The plain way (logits = h @ W^T, then F.cross_entropy) keeps T x V logits, their log-softmax and, in the
backward, their gradient: 12 bytes per token per vocabulary entry in fp32. At a 49k vocabulary and a batch of
4 x 256 that is 0.6 GB, at 8 x 2048 tokens 9.7 GB. ``head_cross_entropy`` never holds more than one chunk's
logits: since the loss is the last op of the step, its gradient with respect to each chunk's logits
(softmax - onehot, over T) is known as soon as the chunk is computed, so the forward computes the gradients of
h and W right away, chunk by chunk, and the backward only scales them by the upstream gradient (the 1/accum of
gradient accumulation). Same products as the plain way (no recomputation); loss and gradients equal it to
float rounding (tests/e2e/test_train.py).
"""

from __future__ import annotations

import torch

# one chunk's logits: about 2^23 float32 values (32 MiB), whatever the vocabulary
CHUNK_ELEMENTS = 2**23


def chunk_tokens(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab)


class _HeadCrossEntropy(torch.autograd.Function):
    """mean over T of -log softmax(h_TD @ w_VD^T)[t, y_T[t]]; products in ``dtype`` (bf16 under autocast),
    the softmax in fp32."""

    @staticmethod
    def forward(ctx, h_TD, w_VD, y_T, dtype, chunk, grad):
        T = h_TD.shape[0]
        hc, wc = h_TD.to(dtype), w_VD.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=h_TD.device)
        gh_TD = torch.empty_like(h_TD) if grad and ctx.needs_input_grad[0] else None
        gw_VD = (torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device)
                 if grad and ctx.needs_input_grad[1] else None)
        for s in range(0, T, chunk):
            h_CD, y_C = hc[s:s + chunk], y_T[s:s + chunk]
            logits_CV = (h_CD @ wc.t()).float()
            lse_C = torch.logsumexp(logits_CV, -1)
            total += (lse_C - logits_CV.gather(1, y_C[:, None]).squeeze(1)).sum()
            if gh_TD is not None or gw_VD is not None:
                g_CV = logits_CV.sub_(lse_C[:, None]).exp_()  # softmax, in place of the logits
                g_CV[torch.arange(len(y_C), device=y_C.device), y_C] -= 1
                g_CV = g_CV.div_(T).to(dtype)
                if gh_TD is not None:
                    gh_TD[s:s + chunk] = g_CV @ wc
                if gw_VD is not None:
                    gw_VD += (g_CV.t() @ h_CD).float()
        ctx.save_for_backward(gh_TD, gw_VD)
        ctx.w_dtype = w_VD.dtype
        return total / T

    @staticmethod
    def backward(ctx, g):
        gh_TD, gw_VD = ctx.saved_tensors  # scaled in place: they are this backward's own, used once
        return (None if gh_TD is None else gh_TD.mul_(g.to(gh_TD.dtype)),
                None if gw_VD is None else gw_VD.mul_(g).to(ctx.w_dtype), None, None, None, None)


def head_cross_entropy(h_TD: torch.Tensor, w_VD: torch.Tensor, y_T: torch.Tensor, chunk: int = 0) -> torch.Tensor:
    """The mean cross-entropy of the head w_VD (logits h @ w^T) against targets y_T, one chunk of tokens at a
    time (``chunk`` tokens; 0: chunk_tokens(V)). Under autocast the products are in its dtype, as a Linear's.
    Under no_grad (validation, eval) only the loss: no gradient is computed."""
    dev = h_TD.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h_TD.dtype
    with torch.autocast(dev, enabled=False):
        return _HeadCrossEntropy.apply(h_TD, w_VD, y_T, dtype, chunk or chunk_tokens(w_VD.shape[0]),
                                       torch.is_grad_enabled())
