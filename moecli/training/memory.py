"""What training needs in memory, per process, before anything is allocated: the check ``moe train`` makes, and
the figures it prints.

* States: float32 weights, gradients and AdamW's two moments, 16 bytes per parameter, as each process holds them:
  all of them in data parallelism, 1/N of them under ``--fsdp``, 1/N of the routed experts under
  ``--expert-parallel``. bf16-mixed adds the forward's 16-bit copies of the weights (2 bytes per parameter
  each forward holds), all-gathered whole under FSDP one block at a time.
* Activations of one micro-batch (batch_size / processes / grad_accum sequences): what autograd keeps for the
  backward, counted per token per layer from the layer's kind (below), the embedding's output, and the head's
  chunked loss (model/loss.py). With activation checkpointing each block keeps only its input, and one block at a time
  is recomputed with its full activations.

The per-layer counts are of the tensors this code's forward saves: an upper bound, since autograd frees early
ones while the backward runs and the gradients fill in. On top, ALLOCATOR_SLACK of them for the heap: freed
blocks malloc keeps, fragmented, from step to step. Measured (fp32, 2 cores, peak RSS above the RSS before the
model): at the 692M-parameter shape of benchmarks/train_real_shape.py, states + activations 12.94 GiB, peak 12.96
GiB; at d=256, 4 layers, 8 experts, batch 16 x 256 (tests/e2e/test_train.py), 772 MiB, peak 860-930 MiB (12-28% of the
activations over).
"""

from __future__ import annotations

import resource
from dataclasses import dataclass, replace

import torch

from moecli.errors import UserError
from moecli.model.loss import chunk_tokens
from moecli.model.params import param_counts
from moecli.parallel.device import available_memory

GiB = 2**30
STATE_BYTES = 16  # fp32 weight + gradient + AdamW exp_avg + exp_avg_sq
ALLOCATOR_SLACK = 0.3  # of the activations: what the heap holds on to between steps (module docstring)


@dataclass
class Layout:
    """How the run is spread: processes, and what each one holds."""
    procs: int = 1
    expert_parallel: bool = False
    fsdp: bool = False
    trainable: int | None = None  # parameters that train (--train-experts, --lora); None: all of them
    base_bytes: int = 4  # bytes per frozen parameter (--lora --base-dtype bfloat16: 2)
    adapters: bool = False  # --lora: the trainable parameters come on top of the frozen ones


def _attention_elems(r, i: int) -> int:
    """Values per token the attention part of block i saves: the norm's input and output, q, k, v (and their
    rotated copies), the attention output and the output projection's."""
    m = r.model
    D = m.d_model
    if m.layer_type(i) == "linear":  # Gated DeltaNet: projections, conv output, q/k/v, gates, norm
        k, v = m.linear_key_heads * m.linear_key_dim, m.linear_value_heads * m.linear_value_dim
        return 3 * D + 4 * (2 * k + 2 * v) + 2 * v
    if m.attention == "mla":
        H = m.n_heads
        q = H * (m.qk_nope_head_dim + m.qk_rope_head_dim)
        return 3 * D + 3 * q + m.kv_lora_rank + 2 * H * (m.qk_nope_head_dim + m.v_head_dim) + H * m.v_head_dim
    q, kv = m.n_heads * m.hd, m.n_kv_heads * m.hd
    return 3 * D + 3 * q + 3 * kv + q * (2 if m.attention_gate else 1)


def _ffn_elems(r, i: int) -> int:
    """Values per token block i's FFN saves: the norm's, then for a dense FFN gate, up, their product; for an
    MoE the router's scores, each of the k copies' input, gate, up, silu and product, output and weighted
    output, the shared expert's, and the combined output."""
    D = r.model.d_model
    if not r.is_moe_layer(i):
        return 3 * D + 4 * r.model.ffn_dim
    m = r.moe
    shared = m.shared_hidden
    return 3 * D + 4 * m.num_experts + m.top_k * (3 * D + 4 * m.expert_ffn) + (4 * shared + D if shared else 0)


def activation_bytes(r, tokens: int) -> int:
    """Bytes of activations one micro-batch of ``tokens`` tokens keeps for its backward (module docstring)."""
    m, t = r.model, r.train
    width = 2 if t.precision == "bf16-mixed" else 4  # products' outputs in bf16; norms and softmax stay fp32
    per_layer = [(_attention_elems(r, i) + _ffn_elems(r, i)) for i in range(m.n_layers)]
    if t.activation_checkpointing:
        body = m.n_layers * m.d_model * 4 + max(per_layer) * width  # block inputs, and one block recomputed
    else:
        body = sum(per_layer) * width
    head = min(tokens, chunk_tokens(m.vocab_size)) * m.vocab_size * 4 * 3  # one chunk: logits, softmax, copy
    return tokens * (body + 2 * m.d_model * 4) + head + tokens * m.d_model * 8  # + embedding, final norm, dh


def training_memory(r, layout: Layout = Layout()) -> dict:
    """Bytes per process: states, bf16 weight copies, activations; and their total (``peak``)."""
    total, experts = param_counts(r)
    n = layout.procs
    held = total - experts + experts // n if layout.expert_parallel and n > 1 else total
    if layout.fsdp and n > 1:  # everything 1/N: experts split by expert parallelism, or sharded by FSDP
        held = total / n
    states = int(held * STATE_BYTES)
    copies = merged = 0
    if layout.trainable is not None:  # the rest frozen: weights only, no gradient or AdamW state; each MoE layer's
        # experts merged with their trained rows (or adapters) once per forward, kept for its backward
        # (GroupedExperts.weights)
        trained = STATE_BYTES if layout.adapters else STATE_BYTES - 4  # adapters: their fp32 weights too
        states = int(held * layout.base_bytes + layout.trainable * trained)
        merged = int(4 * experts)
    if r.train.precision == "bf16-mixed":
        # the forward's bf16 weights: every layer's until the backward has used them; under FSDP only the
        # layer being computed is whole (its own copy), the rest shards
        copies = int(2 * (held if not (layout.fsdp and n > 1) else held + total / max(1, r.model.n_layers)))
    micro = r.train.batch_size // max(1, n) // max(1, r.train.grad_accum)
    kept = activation_bytes(r, micro * r.train.seq_len)
    acts = int(kept * (1 + ALLOCATOR_SLACK))
    return {"states": states, "bf16_copies": copies, "merged_experts": merged, "activations": acts,
            "peak": states + copies + merged + acts, "saved_for_backward": kept, "micro_batch": micro,
            "tokens_per_micro_batch": micro * r.train.seq_len}


def proc_status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM, RssAnon, ...) in bytes; 0 where /proc is not there."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def current_rss() -> int:
    """This process's resident memory now, in bytes (VmRSS)."""
    return proc_status_bytes("VmRSS")


def peak_rss() -> int:
    """This process's peak resident memory so far, in bytes, as the OS counts it (getrusage)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _size(n: float) -> str:
    """Bytes as GiB, or as MiB below 1 GiB (a toy run's figures are not all 0.00 GiB)."""
    return f"{n / GiB:,.2f} GiB" if n >= GiB else f"{n / 2**20:,.0f} MiB"


def describe(mem: dict) -> str:
    """One line: what the estimate is made of."""
    extra = f" + {_size(mem['bf16_copies'])} bf16 weight copies" if mem["bf16_copies"] else ""
    if mem.get("merged_experts"):
        extra += f" + {_size(mem['merged_experts'])} experts merged with their trained rows"
    return (f"{_size(mem['peak'])} per process: {_size(mem['states'])} weights, gradients and AdamW "
            f"state{extra} + {_size(mem['activations'])} activations ({mem['micro_batch']} x "
            f"{mem['tokens_per_micro_batch'] // max(1, mem['micro_batch'])} tokens per micro-batch)")


def what_fits(r, layout: Layout, avail: int) -> list[str]:
    """The changes (flags) under which the run's estimate fits in ``avail`` bytes, cheapest first."""
    t = r.train
    tries = []
    for accum in (2, 4, 8, 16):
        if t.batch_size % (layout.procs * t.grad_accum * accum) == 0:
            tries.append((f"--grad-accum {t.grad_accum * accum}", replace(t, grad_accum=t.grad_accum * accum)))
    if not t.activation_checkpointing:
        tries.append(("--activation-checkpointing", replace(t, activation_checkpointing=True)))
    if t.precision != "bf16-mixed":
        tries.append(("--precision bf16-mixed", replace(t, precision="bf16-mixed")))
    for b in (t.batch_size // 2, t.batch_size // 4, t.batch_size // 8):
        if b >= layout.procs * t.grad_accum and b % (layout.procs * t.grad_accum) == 0:
            tries.append((f"--batch-size {b}", replace(t, batch_size=b)))
    fits = []
    for flag, train in tries:
        if training_memory(replace(r, train=train), layout)["peak"] <= avail and not any(
                flag.split()[0] == f.split()[0] for f in fits):
            fits.append(flag)
    return fits


# ---------------------------------------------------------------- the check before a run, and its mode

LEAN_ABOVE = 0.8  # of the memory available: above it, training trades speed for a lower peak (lean_mode)


def lean_mode(memory: dict, device: torch.device, procs_here: int) -> bool:
    """Whether a CPU run's estimate is close enough to the memory available (per process on this machine) that
    it should free its gradients each step and return freed blocks to the system: at 692M parameters in fp32, a
    peak of 11.5 GiB instead of 12.6-13.0, at 61 instead of 89-102 tokens/s (benchmarks/README.md, training at real
    sizes)."""
    if device.type != "cpu":
        return False
    avail = available_memory()
    return avail is not None and memory["peak"] * procs_here > LEAN_ABOVE * avail


def check_training_fits(recipe, layout: Layout, procs_here: int) -> None:
    """Refuse, before anything is allocated, a CPU run whose estimated peak (states, bf16 copies and the
    micro-batch's activations, times the processes on this machine) exceeds the memory available, naming the
    flags under which it would fit."""
    mem = training_memory(recipe, layout)
    avail = available_memory()
    if avail is None or mem["peak"] * procs_here <= avail:
        return
    fits = what_fits(recipe, layout, avail // procs_here)
    hint = ("it fits with " + ", or ".join(fits)) if fits else (
        "train a smaller model (e.g. --set model.n_layers=... or model.d_model=...)"
        + ("" if layout.fsdp else ", or shard it over processes (--nproc N --fsdp)"))
    per = f" x {procs_here} processes" if procs_here > 1 else ""
    raise UserError(f"{recipe.name}: training needs about {describe(mem)}{per}, {avail / 2**30:.1f} GiB available "
                    f"to this process; {hint}")
