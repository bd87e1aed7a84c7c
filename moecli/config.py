"""Recipes: YAML files turned into small typed dataclasses.

A recipe has four sections, each a dataclass below: ``model`` (the transformer's
sizes), ``moe`` (how the FFN of some layers becomes a mixture of experts),
``balance`` (the load-balancing losses and the aux-loss-free bias), and
``train`` (the optimiser and the data). Every field has a default, so a recipe
only states what differs. Unknown keys and bad values raise ``UserError`` with a
one-line message naming the file and the field.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from moecli.errors import UserError
from moecli.model import rope

RECIPE_DIR = Path(__file__).resolve().parent / "recipes"
SEED_STRIDE = 1_000_003  # seeds of step (or expert) s of a run seeded n: n * SEED_STRIDE + s
PRECISIONS = ("fp32", "bf16-mixed")  # train.precision
SCHEDULES = ("cosine", "linear", "wsd", "constant")  # train.lr_schedule
LAYER_TYPES = ("full", "sliding", "chunked", "nope", "linear")  # model.layer_types
EXPERT_ACTS = ("swiglu", "clamped_swiglu")  # moe.expert_act


@dataclass
class ModelConfig:
    vocab_size: int = 256  # byte-level tokenizer by default: one token per byte
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: int = 2  # grouped-query attention: each kv head serves n_heads/n_kv_heads query heads
    head_dim: int = 0  # 0 -> d_model // n_heads (Qwen3 sets it explicitly)
    context: int = 256  # longest sequence RoPE and generation plan for
    ffn_dim: int = 512  # hidden size of the dense SwiGLU FFN (dense layers only)
    rope_theta: float = 10000.0
    # RoPE variants (model/rope.py): default | linear | dynamic | yarn | llama3. The scaling ones extend a model
    # pretrained at rope_original_context tokens (0 -> context) by rope_factor, as Llama 3.1, YaRN and NTK configs do
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_original_context: int = 0
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths above original/low are divided by the factor ...
    rope_high_freq_factor: float = 4.0  # ... below original/high kept, a smooth ramp between
    rope_beta_fast: float = 32.0  # yarn: frequencies turning more than beta_fast times in the original context keep
    rope_beta_slow: float = 1.0  # theirs, fewer than beta_slow are divided by the factor, a ramp between
    rope_truncate: bool = True  # yarn: round the ramp's ends to whole dims
    rope_attention_factor: float = 0.0  # yarn: scales cos and sin; 0 -> 0.1 ln(factor) + 1, or the mscale ratio
    rope_mscale: float = 0.0  # yarn (DeepSeek): attention factor mscale(factor, mscale) / mscale(factor, all_dim)
    rope_mscale_all_dim: float = 0.0
    rope_partial: float = 1.0  # the fraction of each head's dims that rotate (GLM, partial_rotary_factor)
    rope_interleave: bool = False  # rotate dim pairs (2i, 2i+1) instead of halves (DeepSeek's checkpoints)
    # attention variant (model/attention.py): gqa | mla (DeepSeek-V2/V3 multi-head latent attention, then:)
    attention: str = "gqa"
    q_lora_rank: int = 0  # mla: queries through a bottleneck of this rank with its RMSNorm (0 -> one projection)
    kv_lora_rank: int = 0  # mla: keys and values from one compressed latent of this width per token
    qk_nope_head_dim: int = 0  # mla: per-head query/key dims without RoPE ...
    qk_rope_head_dim: int = 0  # ... and with it (one rope key shared by all heads)
    v_head_dim: int = 0  # mla: per-head value dims
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 puts biases on q/k/v projections
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before RoPE
    qk_norm_full: bool = False  # OLMoE: RMSNorm over the whole q and k projections instead
    o_bias: bool = False  # GPT-OSS: a bias on the output projection too
    attention_sinks: bool = False  # GPT-OSS: a learned logit per head in each softmax's denominator
    # per-layer attention (GQA), a pattern repeated over the layers ([] -> all full): full | sliding (the last
    # sliding_window tokens, GPT-OSS) | chunked (tokens of the query's own attention_chunk, Llama 4) | nope (full,
    # without RoPE: Llama 4's NoPE layers) | linear (Gated DeltaNet, Qwen3-Next: a recurrent state, no KV cache)
    layer_types: list[str] = field(default_factory=list)
    sliding_window: int = 0
    attention_chunk: int = 0
    qk_l2_norm: bool = False  # Llama 4: q and k L2-normalised (no weight) after RoPE, on RoPE layers
    # Llama 4 attention temperature tuning on nope layers: queries times 1 + temperature_scale x
    # log(1 + floor((position + 1) / temperature_floor)), sharper attention far into a long context; 0 -> off
    temperature_floor: int = 0
    temperature_scale: float = 0.1
    attention_gate: bool = False  # Qwen3-Next: q_proj also gives a per-head gate; the output times sigmoid(gate)
    norm_zero_centered: bool = False  # Qwen3-Next: every RMSNorm scales by (1 + weight), its weight starting at 0
    # Gated DeltaNet (linear layers): key / value heads and their dims, the causal conv's width, the chunk of the
    # parallel form (training and prefill; decoding is recurrent)
    linear_key_heads: int = 0
    linear_value_heads: int = 0
    linear_key_dim: int = 0
    linear_value_dim: int = 0
    linear_conv: int = 4
    linear_chunk: int = 64
    init_std: float = 0.02

    def validate(self) -> None:
        for name in ("vocab_size", "n_layers", "d_model", "n_heads", "n_kv_heads", "context", "ffn_dim"):
            _check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        _check(self.head_dim >= 0, "head_dim", f"must be >= 0, got {self.head_dim}")
        _check(self.n_heads % self.n_kv_heads == 0, "n_kv_heads",
               f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim == 0:
            _check(self.d_model % self.n_heads == 0, "n_heads",
                   f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}) unless head_dim is set")
        _check(self.attention in ("gqa", "mla"), "attention", f"must be gqa or mla, got {self.attention!r}")
        if self.attention == "mla":
            for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                _check(getattr(self, name) >= 1, name, f"must be >= 1 with attention mla, got {getattr(self, name)}")
            _check(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", f"must be even, got {self.qk_rope_head_dim}")
            _check(self.q_lora_rank >= 0, "q_lora_rank", f"must be >= 0, got {self.q_lora_rank}")
            _check(not (self.qk_norm or self.qk_norm_full), "qk_norm", "not with attention mla")
        else:
            _check(self.hd % 2 == 0, "head_dim", f"head dimension must be even for RoPE, got {self.hd}")
        _check(self.rope_theta > 0, "rope_theta", f"must be > 0, got {self.rope_theta}")
        rope.validate(self, _check)
        _check(0 < self.norm_eps < 1, "norm_eps", f"must be in (0, 1), got {self.norm_eps}")
        _check(self.init_std > 0, "init_std", f"must be > 0, got {self.init_std}")
        _check(not (self.qk_norm and self.qk_norm_full), "qk_norm_full", "qk_norm and qk_norm_full exclude each other")
        bad = [t for t in self.layer_types if t not in LAYER_TYPES]
        _check(not bad, "layer_types", f"entries must be {', '.join(LAYER_TYPES)}, got {bad[0]!r}" if bad else "")
        _check(self.attention == "gqa" or not (set(self.layer_types) - {"full"} or self.attention_sinks), "layer_types",
               "sliding, chunked and nope layers and attention sinks need attention gqa")
        _check(self.sliding_window >= 0 and self.attention_chunk >= 0 and self.temperature_floor >= 0,
               "sliding_window", "sliding_window, attention_chunk and temperature_floor must be >= 0")
        _check("sliding" not in self.layer_types or self.sliding_window >= 1, "sliding_window",
               "must be >= 1 with sliding layers")
        _check("chunked" not in self.layer_types or self.attention_chunk >= 1, "attention_chunk",
               "must be >= 1 with chunked layers")
        if "linear" in self.layer_types:
            for name in ("linear_key_heads", "linear_value_heads", "linear_key_dim", "linear_value_dim", "linear_conv",
                         "linear_chunk"):
                _check(getattr(self, name) >= 1, name, f"must be >= 1 with linear layers, got {getattr(self, name)}")
            _check(self.linear_value_heads % self.linear_key_heads == 0, "linear_value_heads",
                   f"must be a multiple of linear_key_heads ({self.linear_key_heads}), got {self.linear_value_heads}")

    def layer_type(self, i: int) -> str:
        """Layer i's attention: full, sliding, chunked or nope (layer_types repeated over the layers)."""
        return self.layer_types[i % len(self.layer_types)] if self.layer_types else "full"

    @property
    def hd(self) -> int:
        return self.head_dim or self.d_model // self.n_heads


@dataclass
class MoEConfig:
    num_experts: int = 0  # 0 -> every FFN is dense (a dense baseline)
    top_k: int = 2  # experts per token: 1 Switch, 2 GShard/Mixtral, 8 DeepSeek-V3
    expert_ffn: int = 256  # hidden size of one routed expert; fine-grained = many small experts
    num_shared_experts: int = 0  # always-on experts every token passes through (DeepSeekMoE)
    shared_ffn: int = 0  # 0 -> expert_ffn * num_shared_experts, fused into one SwiGLU
    shared_gate: bool = False  # Qwen2-MoE/Qwen3-Next: sigmoid(x.w) scales the shared output
    score_func: str = "softmax"  # softmax (Switch, Mixtral) | sigmoid (DeepSeek-V3)
    renormalize: bool = True  # rescale the k chosen weights to sum to 1 (Mixtral, DeepSeek-V3)
    routed_scaling: float = 1.0  # multiply routed output (DeepSeek-V3 uses 2.5)
    n_groups: int = 1  # group-limited routing: experts split in n_groups groups ...
    topk_groups: int = 1  # ... and a token may only use the best topk_groups of them
    router_jitter: float = 0.0  # Switch: multiply router input by U(1-eps, 1+eps) while training
    router_noise: float = 0.0  # noisy top-k gating: N(0, std^2) added to logits while training
    random_routing: bool = False  # GShard: keep the 2nd..k-th expert with probability min(1, 2*gate)
    capacity_factor: float = 0.0  # 0 -> dropless; else each expert takes ceil(cf*T*k/E) tokens
    # the capacity factor when not training (evaluation, generation, inspect-routing): Switch trains at 1-1.25
    # and evaluates at 2.0, dropping fewer tokens; -1 -> capacity_factor, 0 -> dropless
    eval_capacity_factor: float = -1.0
    router_bias: bool = False  # GPT-OSS: the router's logits have a learned bias
    expert_ffn_bias: bool = False  # GPT-OSS: biases on every routed expert's gate, up and down projections
    # swiglu: silu(gate) * up; clamped_swiglu (GPT-OSS): gate clamped above at swiglu_limit, up to +-swiglu_limit,
    # then (up + 1) * gate * sigmoid(swiglu_alpha * gate)
    expert_act: str = "swiglu"
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    weight_input: bool = False  # Llama 4: the combine weight scales the expert's input instead of its output
    first_k_dense: int = 0  # the first k layers keep a dense FFN (DeepSeek-V3: 3)
    moe_every_n: int = 1  # after those, every n-th layer is MoE (GLaM, Llama 4: 2)

    def validate(self) -> None:
        _check(self.num_experts >= 0, "num_experts", f"must be >= 0, got {self.num_experts}")
        _check(self.score_func in ("softmax", "sigmoid"), "score_func",
               f"must be 'softmax' or 'sigmoid', got {self.score_func!r}")
        _check(self.first_k_dense >= 0, "first_k_dense", f"must be >= 0, got {self.first_k_dense}")
        _check(self.moe_every_n >= 1, "moe_every_n", f"must be >= 1, got {self.moe_every_n}")
        if self.num_experts == 0:
            return
        E = self.num_experts
        _check(1 <= self.top_k <= E, "top_k", f"must be between 1 and num_experts ({E}), got {self.top_k}")
        _check(self.expert_ffn >= 1, "expert_ffn", f"must be >= 1, got {self.expert_ffn}")
        _check(self.num_shared_experts >= 0, "num_shared_experts", f"must be >= 0, got {self.num_shared_experts}")
        _check(self.shared_ffn >= 0, "shared_ffn", f"must be >= 0, got {self.shared_ffn}")
        _check(not self.shared_gate or self.num_shared_experts > 0, "shared_gate",
               "needs num_shared_experts >= 1")
        _check(self.routed_scaling > 0, "routed_scaling", f"must be > 0, got {self.routed_scaling}")
        _check(self.n_groups >= 1 and E % self.n_groups == 0, "n_groups",
               f"must divide num_experts ({E}), got {self.n_groups}")
        _check(1 <= self.topk_groups <= self.n_groups, "topk_groups",
               f"must be between 1 and n_groups ({self.n_groups}), got {self.topk_groups}")
        _check(self.top_k <= self.topk_groups * (E // self.n_groups), "top_k",
               f"{self.top_k} experts cannot be chosen from {self.topk_groups} groups of {E // self.n_groups}")
        _check(0 <= self.router_jitter < 1, "router_jitter", f"must be in [0, 1), got {self.router_jitter}")
        _check(self.router_noise >= 0, "router_noise", f"must be >= 0, got {self.router_noise}")
        _check(self.capacity_factor >= 0, "capacity_factor", f"must be >= 0 (0 = dropless), got {self.capacity_factor}")
        _check(self.eval_capacity_factor >= 0 or self.eval_capacity_factor == -1, "eval_capacity_factor",
               f"must be >= 0 (0 = dropless) or -1 (= capacity_factor), got {self.eval_capacity_factor}")
        _check(not self.random_routing or self.top_k >= 2, "random_routing", "needs top_k >= 2")
        _check(self.expert_act in EXPERT_ACTS, "expert_act",
               f"must be one of {', '.join(EXPERT_ACTS)}, got {self.expert_act!r}")
        _check(self.swiglu_limit > 0, "swiglu_limit", f"must be > 0, got {self.swiglu_limit}")

    @property
    def shared_hidden(self) -> int:
        return self.shared_ffn or self.expert_ffn * self.num_shared_experts


@dataclass
class BalanceConfig:
    aux_loss_coef: float = 0.0  # Switch/GShard load-balance loss E*sum(f_i*P_i); = DeepSeekMoE expert-level loss
    z_loss_coef: float = 0.0  # ST-MoE router z-loss mean(logsumexp(logits)^2): keeps logits small
    seq_aux_loss_coef: float = 0.0  # DeepSeek-V3 sequence-wise balance loss (tiny, e.g. 1e-4)
    device_loss_coef: float = 0.0  # DeepSeekMoE device-level loss over groups of experts
    num_devices: int = 1  # how many expert groups ("devices") the device-level loss balances
    bias_update_rate: float = 0.0  # DeepSeek-V3 aux-loss-free balancing: bias += rate*sign(mean load - load)

    def validate(self) -> None:
        for name in ("aux_loss_coef", "z_loss_coef", "seq_aux_loss_coef", "device_loss_coef", "bias_update_rate"):
            _check(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        _check(self.num_devices >= 1, "num_devices", f"must be >= 1, got {self.num_devices}")


@dataclass
class TrainConfig:
    seed: int = 0
    max_steps: int = 200
    batch_size: int = 16  # sequences per step
    grad_accum: int = 1  # micro-batches per step: the same batch in 1/grad_accum of the activation memory
    seq_len: int = 128  # tokens per sequence (<= model.context)
    lr: float = 3e-3
    # after warmup: cosine or linear decay to lr*min_lr_ratio at max_steps; wsd (warmup-stable-decay) holds
    # lr and decays linearly over the last decay_fraction of the steps, so a run can be extended (--resume
    # with more --max-steps) before its decay starts without changing the steps it already took; constant
    lr_schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2  # wsd only
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 -> no clipping
    eval_interval: int = 50  # steps between validation passes (and a final one)
    eval_batches: int = 8
    ckpt_interval: int = 100  # steps between checkpoints (and a final one)
    keep_best: bool = False  # also keep OUT/best: the model at the lowest validation loss so far
    # early stopping: stop (with a checkpoint) after this many validation passes in a row without a new
    # lowest validation loss; 0 -> run all max_steps
    patience: int = 0
    val_fraction: float = 0.05  # tail of the token stream held out for validation
    # fp32 | bf16-mixed: forward (and so backward) products in bf16 under autocast, on the CPU's bf16
    # units; weights, gradients, optimizer, router and loss stay fp32 (README "bf16 training")
    precision: str = "fp32"
    # recompute each block's activations in the backward (torch.utils.checkpoint) instead of keeping them: about one
    # block's activations held instead of all of them, for about one more forward of compute
    activation_checkpointing: bool = False

    def validate(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "seq_len", "eval_interval", "eval_batches",
                     "ckpt_interval"):
            _check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        _check(self.batch_size % self.grad_accum == 0, "grad_accum",
               f"must divide batch_size ({self.batch_size}), got {self.grad_accum}")
        _check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _check(self.lr_schedule in SCHEDULES, "lr_schedule",
               f"must be one of {', '.join(SCHEDULES)}, got {self.lr_schedule!r}")
        _check(0 < self.decay_fraction <= 1, "decay_fraction", f"must be in (0, 1], got {self.decay_fraction}")
        _check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        _check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(0 <= self.beta1 < 1, "beta1", f"must be in [0, 1), got {self.beta1}")
        _check(0 <= self.beta2 < 1, "beta2", f"must be in [0, 1), got {self.beta2}")
        _check(self.grad_clip >= 0, "grad_clip", f"must be >= 0, got {self.grad_clip}")
        _check(self.patience >= 0, "patience", f"must be >= 0 (0 = no early stopping), got {self.patience}")
        _check(0 < self.val_fraction < 0.5, "val_fraction", f"must be in (0, 0.5), got {self.val_fraction}")
        _check(self.precision in PRECISIONS, "precision",
               f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


@dataclass
class Recipe:
    name: str = "custom"
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def is_moe_layer(self, i: int) -> bool:
        """Layer i gets an MoE FFN after the first_k_dense dense layers, on every moe_every_n-th layer."""
        m = self.moe
        return m.num_experts > 0 and i >= m.first_k_dense and (i - m.first_k_dense + 1) % m.moe_every_n == 0

    def moe_layer_indices(self) -> list[int]:
        return [i for i in range(self.model.n_layers) if self.is_moe_layer(i)]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {"model": ModelConfig, "moe": MoEConfig, "balance": BalanceConfig, "train": TrainConfig}


class FieldError(Exception):
    def __init__(self, field_name: str, msg: str):
        super().__init__(msg)
        self.field_name = field_name
        self.msg = msg


def _check(ok: bool, field_name: str, msg: str) -> None:
    if not ok:
        raise FieldError(field_name, msg)


def _coerce(value, typ, where: str):
    """Check one YAML value against a dataclass field type (int, float, bool, str, a list of one of them)."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise FieldError(where, f"must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise FieldError(where, f"must be an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise FieldError(where, f"must be a finite number, got {value!r}")
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                v = float(value)
            except ValueError:
                pass
            else:
                if math.isfinite(v):
                    return v
        raise FieldError(where, f"must be a number, got {value!r}")
    if typ is str:
        if isinstance(value, str):
            return value
        raise FieldError(where, f"must be a string, got {value!r}")
    if typing.get_origin(typ) is list:
        if not isinstance(value, list):
            raise FieldError(where, f"must be a list, got {value!r}")
        return [_coerce(v, typing.get_args(typ)[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(typ):  # a list of mappings (upcycle's experts)
        return section_from_dict(typ, value, where)
    raise AssertionError(f"unsupported field type {typ}")


def section_from_dict(cls, data, section: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise FieldError(section, f"must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            hint = _closest(str(key), names)
            raise FieldError(f"{section}.{key}", "unknown key" + (f" (did you mean '{hint}'?)" if hint else ""))
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}")
    obj = cls(**kwargs)
    try:
        obj.validate()
    except FieldError as e:
        raise FieldError(f"{section}.{e.field_name}", e.msg) from None
    return obj


def _closest(key: str, names: list[str]) -> str | None:
    import difflib

    m = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    return m[0] if m else None


def recipe_from_dict(data, source: str = "<recipe>") -> Recipe:
    """Build and validate a Recipe; errors name ``source`` and the dotted field."""
    try:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise FieldError("(top level)", "a recipe must be a YAML mapping")
        for key in data:
            if key not in ("name", "description", *SECTIONS):
                hint = _closest(str(key), ["name", "description", *SECTIONS])
                raise FieldError(str(key), "unknown key" + (f" (did you mean '{hint}'?)" if hint else ""))
        kwargs = {sec: section_from_dict(cls, data.get(sec), sec) for sec, cls in SECTIONS.items()}
        for key in ("name", "description"):
            if key in data:
                kwargs[key] = _coerce(data[key], str, key)
        recipe = Recipe(**kwargs)
        _cross_validate(recipe)
    except FieldError as e:
        raise UserError(f"{source}: {e.field_name}: {e.msg}") from None
    return recipe


def _cross_validate(r: Recipe) -> None:
    _check(r.train.seq_len <= r.model.context, "train.seq_len",
           f"must be <= model.context ({r.model.context}), got {r.train.seq_len}")
    if r.moe.num_experts:
        _check(r.moe.first_k_dense < r.model.n_layers, "moe.first_k_dense",
               f"leaves no MoE layer among {r.model.n_layers} layers")
        _check(bool(r.moe_layer_indices()), "moe.moe_every_n", "leaves no MoE layer")
        _check(r.moe.num_experts % r.balance.num_devices == 0, "balance.num_devices",
               f"must divide moe.num_experts ({r.moe.num_experts}), got {r.balance.num_devices}")


def resolve_recipe_path(name_or_path: str) -> Path:
    """A path to a YAML file (or a pipe: the shell's <(command)), or the name of a bundled recipe (``mixtral``)."""
    p = Path(name_or_path)
    if p.exists() and not p.is_dir():
        return p
    if p.exists():
        raise UserError(f"{name_or_path}: not a file")
    bundled = RECIPE_DIR / f"{name_or_path}.yaml"
    if "/" not in name_or_path and bundled.is_file():
        return bundled
    raise UserError(f"{name_or_path}: no such recipe file (bundled recipes: {', '.join(list_recipes())})")


def names_a_recipe(arg: str) -> bool:
    """Whether a command-line argument reads as a recipe (a .yaml/.yml path or a bundled name) rather than DATA."""
    return arg.endswith((".yaml", ".yml")) or ("/" not in arg and (RECIPE_DIR / f"{arg}.yaml").is_file())


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def read_yaml(arg: str, what: str):
    """(the parsed YAML, its source's name) of a file or pipe, or of standard input for ``-``: empty, that is
    refused as holding no ``what`` (most likely a command before the pipe failed; not a wish for all defaults).
    An unreadable file, text that is not UTF-8 and invalid YAML (with its line) are bad input naming the source."""
    stdin = arg == "-"
    source = "<stdin>" if stdin else arg
    try:
        text = sys.stdin.read() if stdin else Path(arg).read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"{source}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{source}: cannot read: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if stdin and not text.strip():
        raise UserError(f"{source}: no {what}: standard input was empty")
    try:
        return yaml.safe_load(text), source
    except RecursionError:  # PyYAML composes nested collections recursively
        raise UserError(f"{source}: invalid YAML: nested too deeply") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{source}: invalid YAML{where}: {problem}") from None


def load_recipe(name_or_path: str) -> Recipe:
    """A recipe from a YAML file or pipe, a bundled recipe's name, or ``-``: YAML on standard input."""
    data, source = read_yaml(name_or_path if name_or_path == "-" else str(resolve_recipe_path(name_or_path)), "recipe")
    return recipe_from_dict(data, source)


def prepare_recipe(recipe_arg: str, overrides: dict | None = None) -> Recipe:
    """A recipe by name or path (- for stdin) with its overrides (--set and the flags) applied."""
    recipe = load_recipe(recipe_arg)
    if overrides:
        recipe = apply_overrides(recipe, overrides, source=f"{recipe_arg} (overrides)")
    return recipe


def apply_overrides(recipe: Recipe, overrides: dict[str, object], source: str = "override") -> Recipe:
    """Return a copy with ``{"train.max_steps": 10, ...}`` applied, validated like the YAML."""
    data = copy.deepcopy(recipe.to_dict())
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        if len(parts) == 1 and parts[0] in ("name", "description"):
            data[parts[0]] = value
            continue
        if len(parts) != 2 or parts[0] not in SECTIONS:
            raise UserError(f"{source}: {dotted}: expected SECTION.FIELD with SECTION one of {', '.join(SECTIONS)}")
        data[parts[0]][parts[1]] = value
    return recipe_from_dict(data, source)


def parse_set_option(item: str) -> tuple[str, object]:
    """``train.lr=1e-3`` -> ("train.lr", 0.001), values read as YAML scalars."""
    if "=" not in item:
        raise UserError(f"--set {item}: expected KEY=VALUE, e.g. --set train.lr=1e-3")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except RecursionError:
        raise UserError(f"--set {item[:60]}: value nested too deeply") from None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value
