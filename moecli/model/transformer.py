"""A decoder-only transformer whose FFNs are dense or MoE, per the recipe.

RMSNorm -> grouped-query attention with RoPE (rope.py) -> RMSNorm -> FFN, pre-norm
residual blocks; numerics follow Hugging Face's Llama/Qwen so checkpoints
convert both ways exactly (see formats/hf.py).

Shape legend (docs/internals.md has the whole one): B batch, S sequence, L keys (the KV cache's slots), D model
dim, H query heads, Hkv kv heads, Dh head dim, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.utils.checkpoint

from moecli.moe.balance import COEFS
from moecli.config import Recipe
from moecli.moe.experts import SwiGLU
from moecli.model.loss import head_cross_entropy
from moecli.moe.layer import MoELayer
from moecli.model.attention import make_attention
from moecli.model.norm import RMSNorm
from moecli.model.rope import cos_sin


class Block(nn.Module):
    def __init__(self, recipe: Recipe, layer_id: int):
        super().__init__()
        cfg = recipe.model
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_zero_centered)
        self.attention = make_attention(cfg, cfg.layer_type(layer_id))
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_zero_centered)
        self.is_moe = recipe.is_moe_layer(layer_id)
        if self.is_moe:
            self.moe = MoELayer(cfg.d_model, recipe.moe, recipe.balance)
        else:
            self.feed_forward = SwiGLU(cfg.d_model, cfg.ffn_dim)

    def forward(self, x_BSD, cos, sin, kv: LayerKV | None = None):
        x_BSD = x_BSD + self.attention(self.attention_norm(x_BSD), cos, sin, kv)
        h = self.ffn_norm(x_BSD)
        return x_BSD + (self.moe(h) if self.is_moe else self.feed_forward(h))


class LayerKV:
    """One layer's keys and values in buffers of `capacity` positions: each forward writes its tokens' in
    place at slot n onwards (no copy of the earlier ones) and attends over the slots from `start` to n.

    A batch of prompts of different lengths (``Transformer.new_cache``) ends every prompt at the same slot:
    a shorter one starts later, and ``pad_BL`` (shared by the layers; True: no token in that slot) keeps
    each row's empty slots out of its attention."""

    def __init__(self, capacity: int, start: int = 0):
        self.capacity, self.start, self.n = capacity, start, start
        self.k_BHLDh = self.v_BHLDh = None  # allocated at the first forward, in its batch, dtype and device
        self.pad_BL: torch.Tensor | None = None
        self.state: tuple | None = None  # a linear (Gated DeltaNet) layer's conv and recurrent states instead

    def extend(self, k_BHSDh: torch.Tensor, v_BHSDh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append S tokens' keys and values; returns those of every slot from start to n (views)."""
        B, H, S, _ = k_BHSDh.shape
        if self.k_BHLDh is None:  # keys and values may differ in width (MLA)
            self.k_BHLDh = k_BHSDh.new_empty(B, H, self.capacity, k_BHSDh.shape[-1])
            self.v_BHLDh = v_BHSDh.new_empty(B, H, self.capacity, v_BHSDh.shape[-1])
        if self.n + S > self.capacity:
            raise ValueError(f"KV cache: {self.n} + {S} tokens exceed its capacity ({self.capacity})")
        self.k_BHLDh[:, :, self.n: self.n + S] = k_BHSDh
        self.v_BHLDh[:, :, self.n: self.n + S] = v_BHSDh
        self.n += S
        return self.k_BHLDh[:, :, self.start: self.n], self.v_BHLDh[:, :, self.start: self.n]

    def pad_mask(self) -> torch.Tensor | None:
        """B x (n - start): True where a row's slot holds no token; None when every slot holds one."""
        return None if self.pad_BL is None else self.pad_BL[:, self.start: self.n]


@dataclass
class KVCache:
    """Keys and values of the tokens a model has seen so far, per layer, so that the next token's forward
    computes only its own (moe generate). Holds at most `capacity` tokens, and never more than the model's
    context (Transformer.forward refuses more)."""
    layers: list[LayerKV]
    pos: int = 0  # tokens seen: the next token's position

    @classmethod
    def empty(cls, n_layers: int, capacity: int) -> "KVCache":
        return cls([LayerKV(capacity) for _ in range(n_layers)])

    def rows(self, first: int, end: int, start: int) -> "KVCache":
        """A cache over rows first:end of these (allocated) buffers whose tokens begin at slot `start`, and
        at position `start` (RoPE): prefilling a prompt there ends it where the batch's longest ends."""
        views = []
        for layer in self.layers:
            view = LayerKV(layer.capacity, start)
            if layer.state is not None:  # a linear layer: its rows of the states, updated in place
                view.state = tuple(t[first:end] for t in layer.state)
            else:
                view.k_BHLDh, view.v_BHLDh = layer.k_BHLDh[first:end], layer.v_BHLDh[first:end]
            views.append(view)
        return KVCache(views, pos=start)

    def filled(self, n: int, pad_BL: torch.Tensor | None) -> None:
        """After prefilling rows through ``rows`` views: every row's tokens end at slot n; pad_BL (True:
        a slot before a shorter prompt's start) is left out of every later attention."""
        self.pos = n
        for layer in self.layers:
            layer.n, layer.pad_BL = n, pad_BL


@dataclass
class ModelOutput:
    logits_BSV: torch.Tensor | None  # None when the forward was given targets: the loss is computed in chunks
    balance_loss: torch.Tensor  # weighted sum of all balance losses over MoE layers (0 if none)
    aux: dict[str, float] = field(default_factory=dict)  # unweighted, averaged over MoE layers
    ce: torch.Tensor | None = None  # with targets: the mean cross-entropy (loss.head_cross_entropy)


class Transformer(nn.Module):
    def __init__(self, recipe: Recipe):
        super().__init__()
        self.recipe = recipe
        cfg = recipe.model
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(recipe, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_zero_centered)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self._rope_cache: dict = {}

    @property
    def moe_layers(self) -> list[tuple[int, MoELayer]]:
        return [(i, b.moe) for i, b in enumerate(self.layers) if b.is_moe]

    def init_weights(self, seed: int) -> None:
        """Normal(0, init_std) everywhere, output projections scaled by 1/sqrt(2*n_layers) (GPT-2)."""
        g = torch.Generator().manual_seed(seed)
        std = self.recipe.model.init_std
        out_std = std / math.sqrt(2 * self.recipe.model.n_layers)
        zero_centered = {id(m.weight) for m in self.modules() if isinstance(m, RMSNorm) and m.zero_centered}
        for name, p in self.named_parameters():
            if id(p) in zero_centered:
                nn.init.zeros_(p)
            elif "norm" in name:
                nn.init.ones_(p)
            elif name.endswith("A_log_H"):  # Gated DeltaNet's decay rates: log U(0.01, 16) per head, as Qwen3-Next's
                with torch.no_grad():
                    p.copy_(torch.empty(p.shape).uniform_(0.01, 16, generator=g).log())
            elif name.endswith("dt_bias_H"):
                nn.init.ones_(p)
            elif name.endswith(".bias") or name.rsplit(".", 1)[-1] in ("b1_EF", "b3_EF", "b2_ED"):
                nn.init.zeros_(p)
            else:
                s = out_std if (name.endswith("wo.weight") or name.endswith("w2.weight") or "w2_EFD" in name) else std
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) * s)

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        """An empty KVCache with every layer's buffers allocated (zeros) for `batch` rows, in the weights'
        dtype and device: for prefilling prompts of different lengths row by row (``KVCache.rows``)."""
        cache = KVCache.empty(len(self.layers), capacity)
        w = self.output.weight
        for layer, block in zip(cache.layers, self.layers):  # zeros: empty slots are masked, but never NaN
            if hasattr(block.attention, "new_state"):  # a linear layer: states, not keys and values
                layer.state = block.attention.new_state(batch, w)
                continue
            H, Dk, Dv = block.attention.kv_shape()
            layer.k_BHLDh, layer.v_BHLDh = w.new_zeros(batch, H, capacity, Dk), w.new_zeros(batch, H, capacity, Dv)
        return cache

    def rope(self, start: int, S: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for positions start..start+S-1 (rope.py). They are slices of the context's, except for dynamic
        NTK scaling, whose frequencies depend on the sequence's length so far (as in transformers)."""
        cfg = self.recipe.model
        if cfg.rope_type == "dynamic":
            cos, sin = cos_sin(cfg, start + S, device)
            return cos[start:], sin[start:]
        key = (max(cfg.context, start + S), str(device))
        if key not in self._rope_cache:
            self._rope_cache[key] = cos_sin(cfg, key[0], device)
        cos, sin = self._rope_cache[key]
        return cos[start: start + S], sin[start: start + S]

    def forward(self, tokens_BS: torch.Tensor, cache: KVCache | None = None,
                targets_BS: torch.Tensor | None = None) -> ModelOutput:
        """Logits for every position. With a cache, tokens_BS continues the tokens it holds (positions
        cache.pos onwards), and the cache is extended with them. The tokens go to the weights' device.
        With targets_BS (training), no logits: their mean cross-entropy, computed in chunks of tokens (ce)."""
        tokens_BS = tokens_BS.to(self.tok_embeddings.weight.device)
        B, S = tokens_BS.shape
        if cache is None:
            cos, sin = self.rope(0, S, tokens_BS.device)
        else:
            context = self.recipe.model.context
            if cache.pos + S > context:
                raise ValueError(f"KV cache: {cache.pos} + {S} tokens exceed the context ({context})")
            cos, sin = self.rope(cache.pos, S, tokens_BS.device)
        x = self.tok_embeddings(tokens_BS)
        recompute = self.training and cache is None and self.recipe.train.activation_checkpointing \
            and torch.is_grad_enabled()
        for i, block in enumerate(self.layers):
            if recompute:  # train.activation_checkpointing: the block's activations are recomputed in the backward
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, None, use_reentrant=False)
            else:
                x = block(x, cos, sin, None if cache is None else cache.layers[i])
        if cache is not None:
            cache.pos += S
        h = self.norm(x)
        if targets_BS is not None:
            ce = head_cross_entropy(h.flatten(0, 1), self.output.weight, targets_BS.to(h.device).flatten())
            return ModelOutput(None, *self._collect_balance(h), ce=ce)
        logits = self.output(h)
        return ModelOutput(logits, *self._collect_balance(logits))

    def _collect_balance(self, like) -> tuple[torch.Tensor, dict[str, float]]:
        bal = self.recipe.balance
        total = like.new_zeros((), dtype=torch.float32)
        sums: dict[str, float] = {}
        layers = self.moe_layers
        for _, moe in layers:
            for name, value in moe.aux.items():
                total = total + getattr(bal, COEFS[name]) * value
                sums[name] = sums.get(name, 0.0) + float(value.detach())
            moe.aux = {}
        return total, {k: v / len(layers) for k, v in sums.items()}

    @torch.no_grad()
    def update_router_biases(self, loads: list[torch.Tensor], rate: float) -> None:
        for (_, moe), load in zip(self.moe_layers, loads):
            moe.update_bias(load, rate)


def autocast(model: nn.Module, precision: str):
    """The forward's autocast context for train.precision: bf16 products for "bf16-mixed", none for "fp32".

    Only the forward goes inside it (autograd runs the backward of each op in the op's own dtype);
    weights stay fp32, and the router and the losses take fp32 inputs by themselves.
    """
    device = next(model.parameters()).device.type
    return torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")


class _SkipInit(torch.overrides.TorchFunctionMode):
    """Initialisers (normal_, uniform_, zero_, fill_) do nothing to meta tensors. They would compute nothing
    anyway, but torch 2.13 runs normal_ on meta through its Python references, whose first use imports
    torch._dynamo: about 1 s added to every command that describes or loads a model."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in ("normal_", "uniform_", "zero_", "fill_"):  # torch.nn.init's too
            t = args[0] if args else kwargs.get("tensor")
            if isinstance(t, torch.Tensor) and t.is_meta:
                return t
        return func(*args, **kwargs)


def meta_model(recipe: Recipe) -> Transformer:
    """The recipe's model on PyTorch's meta device: shapes only, no memory and no initialisation (a recipe of
    any size is described in milliseconds; a loader then fills it, checkpoint.load_into)."""
    with torch.device("meta"), _SkipInit():
        return Transformer(recipe)


def meta_block(recipe: Recipe, layer_id: int) -> Block:
    """Layer layer_id's block on the meta device (shapes only), as meta_model builds it."""
    with torch.device("meta"), _SkipInit():
        return Block(recipe, layer_id)


def build_model(recipe: Recipe, seed: int | None = None) -> Transformer:
    model = Transformer(recipe)
    model.init_weights(recipe.train.seed if seed is None else seed)
    return model
