"""Experts: SwiGLU feed-forward networks, one dense and one grouped (3D weights).

Shape legend: N routed token-copies (sorted by expert), D model dim, F hidden dim, E experts,
n one expert's token-copies.

The grouped experts' activation is SwiGLU, silu(gate) * up, or GPT-OSS's clamped form (``clamped_swiglu``), with
or without biases on the three projections (GPT-OSS has them); both paths below compute either.

On a CUDA GPU (compute capability 8.0 or later) with bf16 compute, the grouped experts run as three grouped GEMMs
(torch._grouped_mm, ``GROUPED_MM``), without copying the row counts to the host. The grouped experts have two CPU
paths with the same results: a plain loop over experts
(autograd does the backward), and for big enough layers on more than one intra-op thread
(16-bit compute, or fp32 training with many experts), experts split over worker threads that
each run on one core, forward and backward (``_ThreadedSwiGLU``). See ``use_threads``.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from moecli.moe import cpu_threads
from moecli.errors import UserError

# None: choose (use_threads); True/False: force the threaded / loop path where it can run (tests,
# benchmarks). The environment variable MOECLI_EXPERT_THREADS=auto|on|off sets it for a run.
THREADED: bool | None = None
_ENV_CHOICES = {"auto": None, "on": True, "1": True, "off": False, "0": False}
# THREADED = None takes the threaded path for 16-bit compute with at least this much work (multiply-adds of
# one of the three products: rows x D x F). The layer on 2 cores (benchmarks/expert_paths.py, README "Which
# expert path"), threaded speed over the loop's: bf16 fwd+bwd 1.08-1.35x from 2^30 up; forwards at 2^28
# 0.71-0.74x.
MIN_THREADED_WORK = 2**30
# fp32 products already use both cores, and the threaded path gains only in training with many experts:
# layer fwd+bwd 1.06-1.13x at 32-64 experts from 2^32 up, 0.99-1.05x at 8-16; forward alone 0.92-1.04x;
# `moe train` steps 1.05-1.19x at 64 experts (2^32) but 0.95x at 8 (d=512, 2^31) and 0.98x at 32 (2^31).
FP32_MIN_EXPERTS = 32
FP32_MIN_THREADED_WORK = 2**32
# 16-bit products on the CPU run on oneDNN, which builds (JIT-compiles) a kernel for each new product
# shape and caches it: for a 1024 x 512 x 1024 bf16 product that takes 0.4 ms, a row count it has not
# seen before costs about 3 ms. An expert's row count changes every training step, so both paths round
# each expert's rows up to a few sizes (padded_rows; the added rows are zeros and add nothing to any
# result) and later steps reuse the kernels. None: pad for 16-bit compute on the CPU; True/False: force.
PAD_ROWS: bool | None = None


class SwiGLU(nn.Module):
    """y = w2(silu(w1 x) * w3 x): the dense FFN, also used for shared experts."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)  # gate
        self.w3 = nn.Linear(d_model, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, d_model, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def clamped_swiglu(a: torch.Tensor, b: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """GPT-OSS's expert activation of gate a and up b: (clamp(b, +-limit) + 1) * a' * sigmoid(alpha * a'), with
    a' = min(a, limit)."""
    a = a.clamp(max=limit)
    return (b.clamp(-limit, limit) + 1) * (a * torch.sigmoid(a * alpha))


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored as 3D tensors: w1_EDF, w3_EDF (gate, up) and w2_EFD (down); with ``bias``, also
    b1_EF, b3_EF, b2_ED. ``act``: "swiglu", or "clamped_swiglu" with ``alpha`` and ``limit`` (GPT-OSS).

    ``forward(x_ND, counts_E)`` takes tokens already sorted by expert: the first
    counts_E[0] rows go to expert 0, the next counts_E[1] to expert 1, and so on.
    Each expert multiplies only its own contiguous slice.
    """

    def __init__(self, num_experts: int, d_model: int, hidden: int, bias: bool = False, act: str = "swiglu",
                 alpha: float = 1.702, limit: float = 7.0):
        super().__init__()
        self.num_experts, self.d_model, self.hidden = num_experts, d_model, hidden
        self.act = None if act == "swiglu" else (alpha, limit)  # None: silu(gate) * up
        self.last_path = ""  # "threaded" or "loop": which path the last forward took (benchmarks, tests)
        self.w1_EDF = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.w3_EDF = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.w2_EFD = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        for w in (self.w1_EDF, self.w3_EDF, self.w2_EFD):  # Transformer.init_weights re-initialises with a seed
            nn.init.normal_(w, std=0.02)
        self.b1_EF = self.b3_EF = self.b2_ED = None
        if bias:
            self.b1_EF = nn.Parameter(torch.zeros(num_experts, hidden))
            self.b3_EF = nn.Parameter(torch.zeros(num_experts, hidden))
            self.b2_ED = nn.Parameter(torch.zeros(num_experts, d_model))
        self.register_buffer("trained_E", None, persistent=False)  # train_only's experts (None: all train)
        self.lora: ExpertLoRA | None = None  # LoRA on every expert (model/lora.py), added in weights()

    def weight_names(self) -> tuple[str, ...]:
        return ("w1_EDF", "w3_EDF", "w2_EFD") + (("b1_EF", "b3_EF", "b2_ED") if self.b1_EF is not None else ())

    def train_only(self, experts: list[int]) -> None:
        """Fine-tune only these experts (ESFT): the stored weights are frozen, and the chosen experts' rows train
        as parameters of their own (``trained_<name>``), merged into the stored ones by ``weights`` in the forward
        and by state_dict(), whose names and shapes stay as they were. Only those rows get gradients and AdamW
        state; each forward makes one merged copy of the layer's expert weights (what its backward keeps)."""
        idx = torch.tensor(sorted(experts), dtype=torch.long, device=self.w1_EDF.device)
        for name in self.weight_names():
            stored = getattr(self, name)
            stored.requires_grad_(False)
            self.register_parameter(f"trained_{name}", nn.Parameter(stored.detach()[idx].clone()))
        self.trained_E = idx
        self.register_state_dict_post_hook(_merged_state)

    def weights(self) -> tuple:
        """(w1_EDF, w3_EDF, w2_EFD, b1_EF, b3_EF, b2_ED) as the forward uses them (biases None where there are
        none): the parameters, or under train_only the stored weights with the trained rows put in."""
        ws = tuple(getattr(self, n) for n in self.weight_names())
        if self.trained_E is not None:
            ws = tuple(w.index_copy(0, self.trained_E, getattr(self, f"trained_{n}").to(w.dtype))
                       for n, w in zip(self.weight_names(), ws))
        if self.lora is not None:  # W + A B x scale per expert, in the adapters' dtype (fp32) at least
            ws = tuple(w + d for w, d in zip(ws, self.lora.deltas())) + ws[3:]
        return ws if len(ws) == 6 else ws + (None, None, None)

    def biases(self) -> tuple:
        return self.b1_EF, self.b3_EF, self.b2_ED

    def _h(self, a_mF: torch.Tensor, b_mF: torch.Tensor) -> torch.Tensor:
        return F.silu(a_mF) * b_mF if self.act is None else clamped_swiglu(a_mF, b_mF, *self.act)

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor, w_N: torch.Tensor | None = None) -> torch.Tensor:
        """y_ND for x_ND sorted by expert; with w_N (one combine weight per row), y_ND * w_N."""
        w1_EDF, w3_EDF, w2_EFD, *bias = ws = self.weights()
        dtype = use_grouped_mm(x_ND, w1_EDF)
        if dtype is not None:
            self.last_path = "grouped_mm"
            return self._grouped(x_ND, counts_E, w_N, dtype, ws)
        counts = counts_E.tolist()
        pad = pad_rows(x_ND, w1_EDF)
        dtype = use_threads(x_ND, w1_EDF)
        serial = dtype is None and use_serial(x_ND, w1_EDF)
        if serial:
            dtype = torch.float32
        self.last_path = "serial" if serial else "loop" if dtype is None else "threaded"
        if dtype is not None:
            # the weights are cast (a no-op unless autocast) inside, and again in the backward
            bs = [None if b is None else b.to(dtype) for b in bias]
            w_N1 = None if w_N is None else w_N.to(dtype).unsqueeze(-1)
            with torch.autocast("cpu", enabled=False):
                return _ThreadedSwiGLU.apply(x_ND, w1_EDF, w3_EDF, w2_EFD, w_N1, counts, pad, *bs, self.act, serial,
                                             dtype)
        # unbind once (not w[e] per expert): its backward stacks the per-expert
        # gradients in one go instead of writing a full zero gradient per expert.
        w1s, w3s, w2s = w1_EDF.unbind(0), w3_EDF.unbind(0), w2_EFD.unbind(0)
        b1s, b3s, b2s = (None,) * 3 if bias[0] is None else tuple(b.unbind(0) for b in bias)

        def expert(e: int, x_mD: torch.Tensor) -> torch.Tensor:
            a_mF, b_mF = x_mD @ w1s[e], x_mD @ w3s[e]
            if b1s is not None:
                a_mF, b_mF = a_mF + b1s[e], b_mF + b3s[e]
            y_mD = self._h(a_mF, b_mF) @ w2s[e]
            return y_mD if b2s is None else y_mD + b2s[e]

        outs = []
        for e, x_nD in enumerate(x_ND.split(counts)):
            n = counts[e]
            if n == 0:
                continue
            m = padded_rows(n) if pad else n  # m >= n rows: x's extra rows are zeros, y's are dropped
            x_mD = F.pad(x_nD, (0, 0, 0, m - n)) if m > n else x_nD
            outs.append(expert(e, x_mD)[:n])
        if not outs:  # no rows at all, as an expert-parallel rank can receive: still an output of x and the
            # weights (zero gradients), so every rank's backward runs the same collectives and optimizer steps
            outs.append(expert(0, x_ND))
        y_ND = torch.cat(outs, dim=0)
        # in y's dtype, which is bf16 under autocast (the residual add promotes it back)
        return y_ND if w_N is None else y_ND * w_N.to(y_ND.dtype).unsqueeze(-1)

    def _grouped(self, x_ND: torch.Tensor, counts_E: torch.Tensor, w_N: torch.Tensor | None,
                 dtype: torch.dtype, ws: tuple) -> torch.Tensor:
        """All experts in three grouped GEMMs (torch._grouped_mm: expert e's rows end at offs[e]); no copy of the
        counts to the host, so no sync. Products in ``dtype`` (bf16), autograd does the backward."""
        N = x_ND.shape[0]
        w1_EDF, w3_EDF, w2_EFD, b1_EF, b3_EF, b2_ED = ws
        offs = torch.cumsum(counts_E.to(x_ND.device), 0, dtype=torch.int32)
        with torch.autocast(x_ND.device.type, enabled=False):
            x = x_ND.to(dtype)
            a_NF = torch._grouped_mm(x, w1_EDF.to(dtype), offs=offs)
            b_NF = torch._grouped_mm(x, w3_EDF.to(dtype), offs=offs)
            bias = b1_EF is not None  # GPT-OSS: all three projections have them, or none does
            if bias:  # each row's expert's biases, gathered in fp32 so that their gradients (index's backward, a
                # sum over the expert's rows) accumulate in fp32; the sums in the dtype the loop's would be (fp32
                # for fp32 biases under autocast), where the clamps then decide
                e_N = torch.repeat_interleave(torch.arange(self.num_experts, device=x.device), counts_E.to(x.device),
                                              output_size=N)
                out = torch.promote_types(dtype, b1_EF.dtype)
                a_NF = (a_NF + b1_EF.float()[e_N]).to(out)
                b_NF = (b_NF + b3_EF.float()[e_N]).to(out)
            y_ND = torch._grouped_mm(self._h(a_NF, b_NF).to(dtype).contiguous(), w2_EFD.to(dtype), offs=offs)
            if bias:
                y_ND = (y_ND + b2_ED.float()[e_N]).to(out)
            return y_ND if w_N is None else y_ND * w_N.to(y_ND.dtype).unsqueeze(-1)


class ExpertLoRA(nn.Module):
    """LoRA on each of E experts, as peft's ``target_parameters`` puts it on fused expert weights: one low-rank pair
    over the gate and up projections together (D -> 2F) and one over the down projection (F -> D), per expert:
    delta_e = A_e @ B_e x scale, A (E, in, r) uniform in +-1/sqrt(in) (peft's default for lora_A), B (E, r, out)
    zeros, so training starts from the base model. r is the rank."""

    def __init__(self, E: int, D: int, F: int, r: int, scale: float, generator: torch.Generator | None = None):
        super().__init__()
        self.F, self.scale = F, scale
        self.gate_up_A_EDr = nn.Parameter((torch.rand(E, D, r, generator=generator) * 2 - 1) / math.sqrt(D))
        self.gate_up_B_Er2F = nn.Parameter(torch.zeros(E, r, 2 * F))
        self.down_A_EFr = nn.Parameter((torch.rand(E, F, r, generator=generator) * 2 - 1) / math.sqrt(F))
        self.down_B_ErD = nn.Parameter(torch.zeros(E, r, D))

    def deltas(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(delta w1_EDF, delta w3_EDF, delta w2_EFD): what the adapters add to the experts' weights."""
        gu = torch.bmm(self.gate_up_A_EDr, self.gate_up_B_Er2F) * self.scale
        return gu[..., : self.F], gu[..., self.F:], torch.bmm(self.down_A_EFr, self.down_B_ErD) * self.scale


def _merged_state(module: GroupedExperts, state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict() of experts under train_only: the stored names with the trained rows put in, as a checkpoint
    holds them (nothing of the split is saved)."""
    for name, w in zip(module.weight_names(), module.weights()):
        state_dict[prefix + name] = w.detach()
        state_dict.pop(f"{prefix}trained_{name}", None)


# None: the grouped GEMM for bf16 compute on a CUDA GPU of compute capability 8.0 or later (where torch has its
# kernel), the paths below elsewhere; True: wherever torch._grouped_mm runs (the CPU too: tests compare it with
# the loop there); False: never.
GROUPED_MM: bool | None = None


def use_grouped_mm(x_ND: torch.Tensor, w1_EDF: torch.Tensor) -> torch.dtype | None:
    """bf16 when the experts take the grouped GEMM path (GROUPED_MM), else None. Needs torch._grouped_mm, bf16
    compute (autocast's or the weights'), rows (D, F) aligned to 16 bytes, and at least one row."""
    if GROUPED_MM is False or not hasattr(torch, "_grouped_mm") or x_ND.shape[0] == 0:
        return None
    dtype = compute_dtype(w1_EDF)
    E, D, F = w1_EDF.shape
    if dtype != torch.bfloat16 or D % 8 or F % 8:
        return None
    if GROUPED_MM is None and not (x_ND.device.type == "cuda"
                                   and torch.cuda.get_device_capability(x_ND.device) >= (8, 0)):
        return None
    return dtype


def threads_from_env() -> bool | None:
    """MOECLI_EXPERT_THREADS: auto (or unset) -> None, on/1 -> True, off/0 -> False; else bad input."""
    env = os.environ.get("MOECLI_EXPERT_THREADS")
    if env is None:
        return None
    if env.strip().lower() not in _ENV_CHOICES:
        raise UserError(f"MOECLI_EXPERT_THREADS: must be auto, on or off, got {env!r}")
    return _ENV_CHOICES[env.strip().lower()]


def compute_dtype(w1_EDF: torch.Tensor) -> torch.dtype:
    """The experts' products' dtype: the autocast's of the weights' device when one is on, else the weights'."""
    dev = w1_EDF.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else w1_EDF.dtype


def padded_rows(n: int) -> int:
    """n rounded up to a multiple of max(16, 2^(bit_length(n) - 5)): 16 sizes per doubling of n from
    256 up, at most 1/16 extra rows there (1000 -> 1024, 1025 -> 1088); 1..16 -> 16, 17..32 -> 32."""
    if n <= 0:
        return 0
    step = max(16, 1 << max(0, n.bit_length() - 5))
    return -(-n // step) * step


def pad_rows(x_ND: torch.Tensor, w1_EDF: torch.Tensor) -> bool:
    """Whether the experts round their row counts up (PAD_ROWS): by default for bf16/fp16 compute on the CPU."""
    if PAD_ROWS is not None:
        return PAD_ROWS
    return x_ND.device.type == "cpu" and compute_dtype(w1_EDF) in (torch.bfloat16, torch.float16)


def use_threads(x_ND: torch.Tensor, w1_EDF: torch.Tensor) -> torch.dtype | None:
    """The dtype to run the threaded path in, or None for the loop.

    Needs CPU tensors and more than one intra-op thread. Chosen by itself (THREADED = None,
    MOECLI_EXPERT_THREADS unset or auto) for bf16/fp16 compute from MIN_THREADED_WORK up, and for
    fp32 only when autograd will run a backward, with FP32_MIN_EXPERTS experts or more and from
    FP32_MIN_THREADED_WORK up (elsewhere fp32 runs about as fast or faster on the loop); forced on,
    it runs any of them. Under a CPU autocast the compute dtype is autocast's.
    """
    mode = THREADED if THREADED is not None else threads_from_env()
    if x_ND.device.type != "cpu" or torch.get_num_threads() < 2 or mode is False:
        return None
    dtype = compute_dtype(w1_EDF)
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return None
    if mode is None:
        E, D, F = w1_EDF.shape
        work = x_ND.shape[0] * D * F
        if dtype == torch.float32:
            backward = torch.is_grad_enabled() and (x_ND.requires_grad or w1_EDF.requires_grad)
            if not backward or E < FP32_MIN_EXPERTS or work < FP32_MIN_THREADED_WORK:
                return None
        elif work < MIN_THREADED_WORK:
            return None
    return dtype


class _ThreadedSwiGLU(torch.autograd.Function):
    """Grouped SwiGLU experts, each expert computed by one worker thread on one core.

    forward(x_ND, w1_EDF, w3_EDF, w2_EFD, w_N1 or None, counts, pad, b1_EF, b3_EF, b2_ED (or None), act)
    -> y_ND (times w_N1 when given); act None is SwiGLU, (alpha, limit) the clamped form (clamped_swiglu),
    rows sorted by expert as in GroupedExperts, computed in the weights' dtype (x_ND is cast
    per expert, and its gradient summed in x's dtype, as autocast's casts in the loop do).
    Experts are split over workers by token count (cpu_threads.split_by_load); every output row
    and every weight gradient is written by exactly one worker, so results do not depend on
    scheduling. The backward below does autograd's products and elementwise steps in the same
    dtype, so the output and the gradients of x, w2 and the combine weights equal the loop's run
    on one intra-op thread to the bit. The w1 and w3 gradients take x^T as a contiguous copy
    where autograd passes a transposed view: faster, and for some shapes different in the last
    bits (as accurate: tested against fp64). Against the loop on more threads any result can
    differ in the last bits, as torch's own products do between thread counts for some shapes
    (e.g. 241 x 1024 @ 1024 x 512, fp32 and bf16 alike).
    With pad (PAD_ROWS), each expert computes on padded_rows(n) rows, zeros past its n, as the
    loop does, so both run products of the same shapes.
    Applying the combine weights here keeps those N x D products on the workers, in cache,
    instead of whole-tensor passes on the caller.
    For the backward it keeps a = x w1, b = x w3 and the unweighted output per expert, and
    recomputes silu(a) and h = silu(a) * b: less activation memory than autograd keeps for the
    loop, at the same speed as keeping them (measured paired on 2 cores, bf16).
    """

    @staticmethod
    def forward(ctx, x_ND, w1_EDF, w3_EDF, w2_EFD, w_N1, counts, pad=False, b1_EF=None, b3_EF=None, b2_ED=None,
                act=None, serial=False, dtype=None):
        N, D = x_ND.shape
        x_ND = x_ND.contiguous()
        weights = (w1_EDF, w3_EDF, w2_EFD)  # as given (fp32 parameters under autocast): what the backward keeps
        dtype = dtype or w1_EDF.dtype
        w1_EDF, w3_EDF, w2_EFD = (w.to(dtype) for w in weights)
        starts = [0]
        for c in counts:
            starts.append(starts[-1] + c)
        rows = [padded_rows(c) if pad else c for c in counts]  # m >= n rows per expert (PAD_ROWS)
        y_ND = w1_EDF.new_empty(N, D)
        keep = any(ctx.needs_input_grad)  # inference keeps nothing
        saved: list = [None] * len(counts)  # per expert (x cast or padded, a, b, unweighted y); a, b: m x F

        def job(experts):
            def run():
                for e in experts:
                    s, t, m = starts[e], starts[e + 1], rows[e]
                    n = t - s
                    x_mD = _rows(x_ND[s:t], m, dtype)
                    a_mF, b_mF = x_mD @ w1_EDF[e], x_mD @ w3_EDF[e]
                    if b1_EF is not None:
                        a_mF, b_mF = a_mF + b1_EF[e], b_mF + b3_EF[e]
                    h_mF = F.silu(a_mF) * b_mF if act is None else clamped_swiglu(a_mF, b_mF, *act)
                    y_nD = None  # the unweighted output, kept only when the combine weights need it
                    if b2_ED is not None:
                        y_nD = torch.addmm(b2_ED[e], h_mF[:n], w2_EFD[e])
                        if w_N1 is None:
                            y_ND[s:t] = y_nD
                            y_nD = None
                        else:
                            torch.mul(y_nD, w_N1[s:t], out=y_ND[s:t])
                    elif w_N1 is None and m == n:
                        torch.mm(h_mF, w2_EFD[e], out=y_ND[s:t])
                    elif w_N1 is None:
                        y_ND[s:t] = (h_mF @ w2_EFD[e])[:n]
                    else:
                        y_nD = (h_mF @ w2_EFD[e])[:n]
                        torch.mul(y_nD, w_N1[s:t], out=y_ND[s:t])
                    if keep:
                        saved[e] = (x_mD if m > n or x_mD.dtype != x_ND.dtype else None, a_mF, b_mF, y_nD)
            return run

        pool = SERIAL_POOL if serial else cpu_threads.pool()
        groups = cpu_threads.split_by_load(counts, pool.num_workers)
        pool.run([job([e for e in g if counts[e] > 0]) for g in groups])
        if keep:  # through autograd's saved tensors, so a second backward fails as usual, not silently
            ctx.save_for_backward(x_ND, *weights, w_N1, *(t for per in saved for t in (per or (None,) * 4)))
            ctx.dtype = dtype
        ctx.starts, ctx.rows, ctx.groups, ctx.pool = starts, rows, groups, pool
        ctx.act, ctx.bias = act, b1_EF is not None
        return y_ND

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy_ND):
        x_ND, *saved = ctx.saved_tensors
        weights, w_N1, per_expert = saved[:3], saved[3], saved[4:]
        # the 16-bit weights cast again, not kept from the forward: at 692M parameters in bf16, 1.3 GB less
        w1_EDF, w3_EDF, w2_EFD = (w.to(ctx.dtype) for w in weights)
        starts, rows = ctx.starts, ctx.rows
        dy_ND = dy_ND.contiguous()
        dx_ND = torch.empty_like(x_ND)
        g1_EDF, g3_EDF, g2_EFD = (torch.empty_like(w) for w in (w1_EDF, w3_EDF, w2_EFD))
        dw_N1 = None if w_N1 is None else torch.empty_like(w_N1)
        act, bias = ctx.act, ctx.bias
        E, D, Fh = w1_EDF.shape
        gb1_EF, gb3_EF, gb2_ED = (w1_EDF.new_empty(E, Fh), w1_EDF.new_empty(E, Fh), w1_EDF.new_empty(E, D)) \
            if bias else (None, None, None)

        def job(experts):
            def run():
                for e in experts:
                    s, t, m = starts[e], starts[e + 1], rows[e]
                    if s == t:  # no tokens: zero gradient, as the loop's unbind backward gives
                        for g in (g1_EDF, g3_EDF, g2_EFD, gb1_EF, gb3_EF, gb2_ED):
                            if g is not None:
                                g[e].zero_()
                        continue
                    x_mD, a_mF, b_mF, y_nD = per_expert[4 * e: 4 * e + 4]
                    if x_mD is None:
                        x_mD = x_ND[s:t]
                    n, dy_nD = t - s, dy_ND[s:t]
                    # dy with m rows, zeros past n (every gradient those rows reach is 0)
                    if w_N1 is None:
                        dy_mD = _rows(dy_nD, m, dy_nD.dtype)
                    else:  # y * w: d/dw = sum over D of dy * y, d/dy = dy * w (written into the first n rows)
                        torch.sum(dy_nD * y_nD, dim=1, keepdim=True, out=dw_N1[s:t])
                        dy_mD = _zero_tail(n, m, dy_nD)
                        torch.mul(dy_nD, w_N1[s:t], out=dy_mD[:n])
                    dh_mF = dy_mD.mm(w2_EFD[e].t())
                    if act is None:
                        sa_mF = F.silu(a_mF)
                        torch.mm((sa_mF * b_mF).t(), dy_mD, out=g2_EFD[e])
                        da_mF = torch.ops.aten.silu_backward(dh_mF * b_mF, a_mF)
                        db_mF = dh_mF * sa_mF
                    else:  # clamped_swiglu: h = (b' + 1) * a' sigmoid(alpha a'); the clamps pass gradient inside
                        alpha, limit = act
                        ac_mF, bc1_mF = a_mF.clamp(max=limit), b_mF.clamp(-limit, limit) + 1
                        sg_mF = torch.sigmoid(ac_mF * alpha)
                        glu_mF = ac_mF * sg_mF
                        torch.mm((bc1_mF * glu_mF).t(), dy_mD, out=g2_EFD[e])
                        da_mF = dh_mF * bc1_mF * (sg_mF + alpha * glu_mF * (1 - sg_mF)) * (a_mF <= limit)
                        db_mF = dh_mF * glu_mF * (b_mF.abs() <= limit)
                    if bias:
                        torch.sum(da_mF, 0, out=gb1_EF[e])
                        torch.sum(db_mF, 0, out=gb3_EF[e])
                        torch.sum(dy_mD, 0, out=gb2_ED[e])
                    # x^T copied contiguous once for both: a transposed-view operand makes these bf16
                    # products about 1.6x slower (in the layer: 2.1 -> 1.3 ms per expert, 8 x 1024 rows)
                    xt_Dm = x_mD.t().contiguous()
                    torch.mm(xt_Dm, da_mF, out=g1_EDF[e])
                    torch.mm(xt_Dm, db_mF, out=g3_EDF[e])
                    torch.add(da_mF.mm(w1_EDF[e].t())[:n].to(dx_ND.dtype), db_mF.mm(w3_EDF[e].t())[:n].to(dx_ND.dtype),
                              out=dx_ND[s:t])
            return run

        ctx.pool.run([job(g) for g in ctx.groups])
        g1_EDF, g3_EDF, g2_EFD = (g.to(w.dtype) for g, w in zip((g1_EDF, g3_EDF, g2_EFD), weights))
        return dx_ND, g1_EDF, g3_EDF, g2_EFD, dw_N1, None, None, gb1_EF, gb3_EF, gb2_ED, None, None, None


class _Serial:
    """A 'pool' of one: every expert in the calling thread, each product on all of torch's intra-op threads
    (the ``serial`` path: the threaded path's hand-written backward, the loop's parallelism)."""
    num_workers = 1

    @staticmethod
    def run(jobs) -> None:
        for job in jobs:
            job()


SERIAL_POOL = _Serial()
# None: fp32 training on the CPU that does not take the threaded path takes the serial one (_ThreadedSwiGLU's
# forward and hand-written backward, experts one after another in this thread) instead of the autograd loop: the
# loop's backward stacks the per-expert weight gradients into new E x D x F tensors, the serial one writes each
# expert's straight into one E x D x F tensor per weight, and it keeps a, b and y per expert only (benchmarks/train_real_shape.py); False: the loop; True: forced.
SERIAL: bool | None = None


def use_serial(x_ND: torch.Tensor, w1_EDF: torch.Tensor) -> bool:
    """Whether the experts take the serial path (SERIAL): fp32 on the CPU with a backward to come, unless the
    loop is forced (THREADED False, MOECLI_EXPERT_THREADS=off)."""
    if SERIAL is not None:
        return SERIAL and x_ND.device.type == "cpu"
    mode = THREADED if THREADED is not None else threads_from_env()
    backward = torch.is_grad_enabled() and (x_ND.requires_grad or w1_EDF.requires_grad)
    return (mode is not False and backward and x_ND.device.type == "cpu" and compute_dtype(w1_EDF) == torch.float32
            and x_ND.shape[0] > 0)


def _zero_tail(n: int, m: int, like_nD: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A new m x D tensor (like_nD's width and device, dtype or like_nD's) whose rows past n are zero;
    the caller writes the first n."""
    t_mD = like_nD.new_empty(m, like_nD.shape[1], dtype=dtype or like_nD.dtype)
    t_mD[n:] = 0
    return t_mD


def _rows(x_nD: torch.Tensor, m: int, dtype: torch.dtype) -> torch.Tensor:
    """x_nD in dtype with m >= n rows, the rows past n zero; x_nD itself where nothing changes."""
    n = x_nD.shape[0]
    if m == n:
        return x_nD.to(dtype)
    x_mD = _zero_tail(n, m, x_nD, dtype)
    x_mD[:n] = x_nD
    return x_mD
