"""``moe upcycle``: a dense checkpoint -> an MoE checkpoint whose experts start as copies of the dense FFN.

Sparse upcycling (Komatsuzaki et al.) with the variants users ask for:

* granular upcycling: each dense FFN copy is split along its hidden dimension
  into ``granularity`` finer experts (Megatron "virtual groups": the router
  rows of one copy's segments are identical, selection is group-limited to
  whole copies, and ``routed_scaling = granularity`` makes the segments sum
  back to the dense FFN);
* a shared expert holding the dense FFN (the routed experts' down-projections
  then start at zero, so the sum is still the dense FFN);
* Drop-Upcycling: a fraction r of each expert's hidden units re-initialised;
* weight noise; router init random / zero / from k-means of prompts' hidden states;
* experts from several dense models (``--expert DIR``, repeated; mergekit-moe's use): attention, embeddings,
  norms and head from BASE, routed expert i's FFN from source i, the routers' rows from each expert's prompts
  (the mean hidden state of its prompts at that layer, minus its negative prompts', mergekit's "hidden").

Function preservation: with identical experts and renormalised top-k, the MoE
computes the dense function. ``analyse_exactness`` says which options break
that; the converter refuses them unless ``allow_inexact`` and, after writing,
measures the max-abs logit difference on a probe input, layer by layer (layerwise.compare: one layer of the
dense model and one of the MoE in memory at a time). Experts from several models compute no single dense
function: the probe then reports each layer's hidden-state difference against each source's own model.

Conversion streams: tensors are read lazily and written one at a time
(st_stream.SafetensorsWriter), so peak memory is about the largest output
tensor, not the model.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moecli.config import SEED_STRIDE, FieldError, Recipe, read_yaml, recipe_from_dict, section_from_dict
from moecli.formats.checkpoint import load_with_tokenizer, open_checkpoint
from moecli.formats.native import CONFIG_FILE, FORMAT, MODEL_FILE, VERSION, dtype_name, model_state
from moecli.errors import RunFailed, UserError
from moecli.fileio import atomic_dir, atomic_write_json, copy_files, output_lock
from moecli.formats.families import FAMILIES
from moecli.formats.hf import (TOKENIZER_FILES, check_writable, expert_names, hf_config_for, plain_name_map,
                               shard_file_name, write_shard_index)
from moecli.commands.verify import compare, probe_tokens
from moecli.model.transformer import meta_model
from moecli.formats.st_stream import LazyTensors, SafetensorsWriter, assign_shards, nbytes

HF_OUT = {t: f.UPCYCLE_TO for t, f in FAMILIES.items() if f.UPCYCLE_TO}  # a dense family -> the MoE it becomes
MOE_TYPES = tuple(sorted(set(HF_OUT.values())))  # upcycle's Hugging Face output formats


@dataclass
class ExpertSource:
    source: str = ""  # a dense checkpoint of BASE's architecture: routed expert i's FFN comes from it
    prompts: str = ""  # text file: its router rows start at its prompts' mean hidden state (router_init prompts)
    negative_prompts: str = ""  # text file: ... minus these prompts' mean

    def validate(self) -> None:
        if not self.source:
            raise FieldError("source", "required (a dense checkpoint directory)")


@dataclass
class UpcycleOptions:
    # routed experts in each converted layer (copies x granularity); 0 -> len(experts) x granularity, else 8
    num_experts: int = 0
    top_k: int = 0  # experts per token (a multiple of granularity keeps the function); 0 -> min(2, num_experts)
    granularity: int = 1  # split each dense FFN copy into this many finer experts
    shared_experts: int = 0  # 1: keep the dense FFN as an always-on shared expert
    noise: float = 0.0  # std of Gaussian noise added to expert weights, relative to each weight's std
    drop_ratio: float = 0.0  # Drop-Upcycling: fraction of each expert's hidden units re-initialised
    # random | zero | prompts: k-means of the base's hidden states over `prompts`, or with experts each expert's
    # own prompts' mean; "" (default) -> prompts when every expert names its prompts, else random
    router_init: str = ""
    router_std: float = 0.02  # std of a random router init
    prompts: str = ""  # text file for router_init: prompts (default: a built-in sample)
    first_k_dense: int = 0  # leave the first k layers dense ...
    moe_every_n: int = 1  # ... and convert every n-th layer after them
    aux_loss_coef: float = 0.01  # balance loss recorded in the new recipe for further training
    format: str = "auto"  # auto | moecli | mixtral | qwen3_moe | qwen2_moe
    shard_size_mb: float = 2000.0  # Hugging Face output: largest shard
    seed: int = 0
    experts: list[ExpertSource] = dataclasses.field(default_factory=list)  # routed experts' sources (--expert)

    def validate(self) -> None:
        def check(ok, field, msg):
            if not ok:
                raise FieldError(field, msg)

        check(self.num_experts >= 0, "num_experts", f"must be >= 1 (0: the default), got {self.num_experts}")
        check(self.granularity >= 1, "granularity", f"must be >= 1, got {self.granularity}")
        if self.experts:
            n = len(self.experts) * self.granularity
            check(self.num_experts in (0, n), "num_experts",
                  f"must be the number of expert sources x granularity ({n}), got {self.num_experts}")
            self.num_experts = n
        self.num_experts = self.num_experts or 8
        self.top_k = self.top_k or min(2, self.num_experts)
        check(self.num_experts % self.granularity == 0, "num_experts",
              f"must be a multiple of granularity ({self.granularity}), got {self.num_experts}")
        check(1 <= self.top_k <= self.num_experts, "top_k",
              f"must be between 1 and num_experts ({self.num_experts}), got {self.top_k}")
        check(self.shared_experts in (0, 1), "shared_experts", f"must be 0 or 1, got {self.shared_experts}")
        check(self.noise >= 0, "noise", f"must be >= 0, got {self.noise}")
        check(0 <= self.drop_ratio <= 1, "drop_ratio", f"must be in [0, 1], got {self.drop_ratio}")
        check(self.router_init in ("", "random", "zero", "prompts"), "router_init",
              f"must be random, zero or prompts, got {self.router_init!r}")
        if not self.router_init:
            self.router_init = "prompts" if self.experts and all(x.prompts for x in self.experts) else "random"
        for j, x in enumerate(self.experts):
            check(bool(x.prompts) or self.router_init != "prompts", f"experts[{j}].prompts",
                  "required with router_init prompts and expert sources (each expert's router rows come from "
                  "its prompts)")
        check(self.router_std > 0, "router_std", f"must be > 0, got {self.router_std}")
        check(self.first_k_dense >= 0, "first_k_dense", f"must be >= 0, got {self.first_k_dense}")
        check(self.moe_every_n >= 1, "moe_every_n", f"must be >= 1, got {self.moe_every_n}")
        check(self.format in ("auto", "moecli") + MOE_TYPES, "format",
              f"must be auto, moecli, {', '.join(MOE_TYPES)}; got {self.format!r}")
        check(self.shard_size_mb > 0, "shard_size_mb", f"must be > 0, got {self.shard_size_mb}")


def load_options(yaml_path: str | None, overrides: dict) -> UpcycleOptions:
    data = {}
    source = "command line"
    if yaml_path:  # a file, a pipe, or - (standard input)
        data, source = read_yaml(yaml_path, "upcycle options")
        data = data or {}
        if not isinstance(data, dict):
            raise UserError(f"{source}: expected a YAML mapping of upcycle options")
    data.update({k: v for k, v in overrides.items() if v is not None and k != "experts"})
    if overrides.get("experts"):  # --expert DIR (repeated) replaces the YAML's list
        data["experts"] = [{"source": d} for d in overrides["experts"]]
    try:
        return section_from_dict(UpcycleOptions, data, "upcycle")
    except FieldError as e:
        raise UserError(f"{source}: {e.field_name}: {e.msg}") from None


# ---------------------------------------------------------------- the source


class DenseSource:
    """A dense checkpoint (moecli or Hugging Face) read tensor by tensor, in moecli's names."""

    def __init__(self, path: str | Path):
        ckpt = open_checkpoint(path)
        self.dir, self.recipe, self.hf_type = ckpt.directory, ckpt.recipe, None
        if not ckpt.is_hf:
            self.tensors = LazyTensors([self.dir / MODEL_FILE])
            self.names = None
            self.tokenizer_cfg = ckpt.config.get("tokenizer")
            self.hf_config = ckpt.config
        else:
            self.hf_type = ckpt.hf_config["model_type"]
            self.tensors = LazyTensors.from_dir(self.dir)
            self.names = plain_name_map(self.recipe, self.hf_type)
            self.tokenizer_cfg = {"type": "hf", "file": "tokenizer.json"} if (self.dir / "tokenizer.json").is_file() else None
            self.hf_config = ckpt.hf_config
        if self.recipe.moe.num_experts:
            raise UserError(f"{self.dir}: already a mixture-of-experts model; upcycling needs a dense checkpoint")
        self.check_shapes()

    def check_shapes(self) -> None:
        """Every tensor of the dense model its config describes is there with that shape (in the source's
        names), before anything is written."""
        for ours, v in model_state(meta_model(self.recipe)).items():
            theirs = self.name(ours)
            if theirs not in self.tensors:
                raise UserError(f"{self.dir}: tensor {theirs} missing")
            shape = tuple(self.tensors.meta(theirs)[1])
            if shape != tuple(v.shape):
                raise UserError(f"{self.dir}: {theirs} has shape {shape}, {CONFIG_FILE} says {tuple(v.shape)}")

    def name(self, ours: str) -> str:
        return self.names[ours] if self.names is not None else ours

    def get(self, ours: str) -> torch.Tensor:
        return self.tensors.get(self.name(ours))

    def meta(self, ours: str):
        return self.tensors.meta(self.name(ours))

    @property
    def dtype(self) -> torch.dtype:
        return self.meta("tok_embeddings.weight")[0]

    def check_ffn_like(self, base: "DenseSource", layers: list[int]) -> None:
        """Every converted layer's FFN here has the base's shapes (an expert source): else bad input naming this
        source and the tensor."""
        if self.recipe.model.n_layers < max(layers, default=-1) + 1 or self.recipe.model.d_model != base.recipe.model.d_model:
            raise UserError(f"--expert {self.dir}: {self.recipe.model.n_layers} layers of width "
                            f"{self.recipe.model.d_model}; the base {base.dir} has {base.recipe.model.n_layers} of "
                            f"{base.recipe.model.d_model}")
        for i in layers:
            for k in ("w1", "w3", "w2"):
                ours = f"layers.{i}.feed_forward.{k}.weight"
                mine, theirs = tuple(self.meta(ours)[1]), tuple(base.meta(ours)[1])
                if mine != theirs:
                    raise UserError(f"--expert {self.dir}: tensor {self.name(ours)} has shape {mine}, the base's "
                                    f"{base.name(ours)} {theirs}")


def moe_recipe(dense: Recipe, o: UpcycleOptions) -> Recipe:
    g = o.granularity
    F = dense.model.ffn_dim
    if F % g:
        raise UserError(f"granularity: the dense FFN width {F} is not divisible by {g}")
    copies = o.num_experts // g
    exact_groups = g > 1 and o.top_k % g == 0
    moe = {
        "num_experts": o.num_experts, "top_k": o.top_k, "expert_ffn": F // g, "renormalize": True,
        "num_shared_experts": o.shared_experts, "shared_ffn": F if o.shared_experts else 0,
        "routed_scaling": float(g),
        "n_groups": copies if exact_groups else 1, "topk_groups": o.top_k // g if exact_groups else 1,
        "first_k_dense": o.first_k_dense, "moe_every_n": o.moe_every_n,
    }
    data = dense.to_dict()
    data["name"] = f"{dense.name}-upcycled-{o.num_experts}e-top{o.top_k}"
    data["description"] = f"sparse upcycling of {dense.name}: {o.num_experts} experts, top-{o.top_k}" + (
        f", granularity {g}" if g > 1 else "")
    data["moe"] = moe
    data["balance"] = {**data["balance"], "aux_loss_coef": o.aux_loss_coef}
    return recipe_from_dict(data, "upcycle options")


def analyse_exactness(o: UpcycleOptions, out_format: str) -> list[str]:
    """Reasons the upcycled model will not compute the dense function (empty = exact)."""
    why = []
    if o.granularity > 1 and o.top_k % o.granularity:
        why.append(f"top_k {o.top_k} is not a multiple of granularity {o.granularity}, so a token cannot get "
                   "every segment of the dense FFN")
    if o.noise > 0:
        why.append(f"noise {o.noise} makes the experts differ from the dense FFN")
    if o.drop_ratio > 0:
        why.append(f"drop_ratio {o.drop_ratio} re-initialises part of every expert")
    if o.shared_experts and out_format == "qwen2_moe":
        why.append("qwen2_moe scales the shared expert by a sigmoid gate (0.5 at a zero gate), so the output "
                   "is not the dense FFN")
    return why


# ---------------------------------------------------------------- tensor producers


class Producer:
    """Computes each output tensor (moecli names) from the dense source, one at a time."""

    def __init__(self, src: DenseSource, recipe: Recipe, o: UpcycleOptions, router_rows: dict[int, torch.Tensor],
                 experts: list[DenseSource] | None = None):
        self.src, self.r, self.o = src, recipe, o
        self.router_rows = router_rows
        self.experts = experts or []  # expert sources: copy c's FFN is experts[c]'s (none: all the base's)
        self.dtype = src.dtype
        self._cache: tuple[tuple[int, int], dict] | None = None

    def _layer_ffn(self, i: int, copy: int = -1) -> dict[str, torch.Tensor]:
        """The dense FFN of layer i (of expert source ``copy``; -1: the base) as (F, D) gate/up and (D, F) down,
        cached for the layer's experts."""
        if self._cache is None or self._cache[0] != (i, copy):
            src = self.experts[copy] if copy >= 0 else self.src
            self._cache = ((i, copy), {k: src.get(f"layers.{i}.feed_forward.{k}.weight").to(self.dtype)
                                       for k in ("w1", "w3", "w2")})
        return self._cache[1]

    def expert_weight(self, i: int, e: int, key: str) -> torch.Tensor:
        """Expert e of layer i, Hugging Face orientation: w1/w3 (F/g, D), w2 (D, F/g); seeded per (layer, expert)."""
        o = self.o
        g = o.granularity
        full = self._layer_ffn(i, e // g if self.experts else -1)[key]
        hidden_dim = 1 if key == "w2" else 0
        Fg = full.shape[hidden_dim] // g
        w = full.narrow(hidden_dim, (e % g) * Fg, Fg)
        # with a shared expert holding the base's FFN, routed experts copied from it start as a zero residual
        zero_down = o.shared_experts and key == "w2" and not self.experts
        if o.drop_ratio > 0 or o.noise > 0 or zero_down:
            w = w.clone()  # changed below; else written as the source's own tensor (a view of it)
        seed = o.seed * SEED_STRIDE + i * 4099 + e
        if o.drop_ratio > 0:  # Drop-Upcycling: re-draw a random r of the hidden units from the weight's stats
            idx = torch.randperm(Fg, generator=torch.Generator().manual_seed(seed))[: int(round(o.drop_ratio * Fg))]
            gen = torch.Generator().manual_seed(seed * 3 + {"w1": 0, "w3": 1, "w2": 2}[key])
            ff = full.float()
            fresh = (torch.randn(w.shape, generator=gen) * ff.std() + ff.mean()).to(w.dtype)
            w.index_copy_(hidden_dim, idx, fresh.index_select(hidden_dim, idx))
        if o.noise > 0:
            gen = torch.Generator().manual_seed(seed * 7 + {"w1": 0, "w3": 1, "w2": 2}[key])
            w.add_((torch.randn(w.shape, generator=gen) * o.noise * w.float().std()).to(w.dtype))
        if zero_down:
            w.zero_()
        return w

    def moecli_tensor(self, name: str) -> torch.Tensor:
        parts = name.split(".")
        if len(parts) > 3 and parts[2] == "moe":
            i = int(parts[1])
            what = ".".join(parts[3:])
            if what == "router.gate.weight":
                return self.router_rows[i].to(self.dtype)
            if what == "router.expert_bias":
                return torch.zeros(self.r.moe.num_experts)
            if what.startswith("shared."):
                return self._layer_ffn(i)[parts[4]].clone()
            if what.startswith("experts."):
                key = {"w1_EDF": "w1", "w3_EDF": "w3", "w2_EFD": "w2"}[parts[4]]
                return torch.stack([self.expert_weight(i, e, key).t() for e in range(self.r.moe.num_experts)])
            raise AssertionError(name)
        return self.src.get(name)


def make_router_rows(src: DenseSource, recipe: Recipe, o: UpcycleOptions) -> dict[int, torch.Tensor]:
    E, D, g = o.num_experts, recipe.model.d_model, o.granularity
    copies = E // g
    layers = recipe.moe_layer_indices()
    rows = {}
    if o.router_init == "prompts":
        centroids = expert_prompt_rows(src, layers, o) if o.experts else prompt_centroids(src, layers, copies, o)
    gen = torch.Generator().manual_seed(o.seed)
    for i in layers:
        if o.router_init == "zero":
            base = torch.zeros(copies, D)
        elif o.router_init == "random":
            base = torch.randn(copies, D, generator=gen) * o.router_std
        else:
            base = centroids[i]
        rows[i] = base.repeat_interleave(g, dim=0)  # virtual groups: a copy's segments share one router row
    return rows


DEFAULT_PROMPTS = (
    "The quick brown fox jumps over the lazy dog.\n"
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n"
    "In 1815 the Congress of Vienna redrew the map of Europe after the Napoleonic wars.\n"
    "Photosynthesis converts light energy into chemical energy stored in glucose.\n"
    "SELECT name, count(*) FROM users GROUP BY name ORDER BY 2 DESC;\n"
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife.\n"
    "Die Würde des Menschen ist unantastbar. La vie est belle. 東京は日本の首都です。\n"
    "import numpy as np\nx = np.linspace(0, 1, 100)\nprint(x.mean())\n"
)


def _read_prompts(path: str, what: str) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {path}: cannot read prompts: {getattr(e, 'strerror', None) or e}") from None
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"{what} {path}: no prompts (one per line)")
    return prompts


@torch.no_grad()
def expert_prompt_rows(src: DenseSource, layers: list[int], o: UpcycleOptions) -> dict[int, torch.Tensor]:
    """Per layer, one router row per expert source: the base model's mean FFN input (the normed hidden state the
    router sees) over that expert's prompts (one per line, each run from position 0), minus the mean over its
    negative prompts when given, normalised and scaled to router_std * sqrt(D)."""
    model, _, _, tok = load_with_tokenizer(src.dir)
    ctx, D = model.recipe.model.context, model.recipe.model.d_model
    sums: dict[int, torch.Tensor] = {}
    hooks = [model.layers[i].ffn_norm.register_forward_hook(
        lambda mod, inp, out, i=i: sums.__setitem__(i, sums[i] + out.reshape(-1, D).float().sum(0))) for i in layers]

    def mean_states(path: str, what: str) -> dict[int, torch.Tensor]:
        n = 0
        for i in layers:
            sums[i] = torch.zeros(D)
        for prompt in _read_prompts(path, what):
            ids = tok.encode(prompt)[:ctx]
            if ids:
                model(torch.tensor([ids]))
                n += len(ids)
        if not n:
            raise UserError(f"{what} {path}: its prompts encode to no tokens")
        return {i: sums[i] / n for i in layers}

    rows: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    for j, x in enumerate(o.experts):
        pos = mean_states(x.prompts, f"experts[{j}].prompts:")
        neg = mean_states(x.negative_prompts, f"experts[{j}].negative_prompts:") if x.negative_prompts else None
        for i in layers:
            v = pos[i] - (neg[i] if neg else 0)
            rows[i].append(torch.nn.functional.normalize(v, dim=0) * o.router_std * math.sqrt(D))
    for h in hooks:
        h.remove()
    return {i: torch.stack(r) for i, r in rows.items()}


@torch.no_grad()
def prompt_centroids(src: DenseSource, layers: list[int], k: int, o: UpcycleOptions) -> dict[int, torch.Tensor]:
    """k-means (cosine) of each layer's FFN inputs over the prompts; rows scaled to router_std * sqrt(D)."""
    model, _, _, tok = load_with_tokenizer(src.dir)
    try:
        text = Path(o.prompts).read_text(encoding="utf-8") if o.prompts else DEFAULT_PROMPTS
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{o.prompts}: cannot read prompts: {getattr(e, 'strerror', None) or e}") from None
    ids = tok.encode(text)[: model.recipe.model.context * 8]
    if len(ids) < k:
        raise UserError(f"{o.prompts or 'built-in prompts'}: {len(ids)} tokens, need at least {k} (one per expert)")
    ctx = model.recipe.model.context
    captured: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    hooks = [model.layers[i].ffn_norm.register_forward_hook(
        lambda mod, inp, out, i=i: captured[i].append(out.reshape(-1, out.shape[-1]).float())) for i in layers]
    for s in range(0, len(ids), ctx):
        model(torch.tensor([ids[s: s + ctx]]))
    for h in hooks:
        h.remove()
    gen = torch.Generator().manual_seed(o.seed)
    D = model.recipe.model.d_model
    out = {}
    for i in layers:
        X = torch.nn.functional.normalize(torch.cat(captured[i]), dim=-1)
        C = X[torch.randperm(X.shape[0], generator=gen)[:k]].clone()
        for _ in range(20):
            assign = (X @ C.t()).argmax(-1)
            for c in range(k):
                members = X[assign == c]
                if len(members):
                    C[c] = torch.nn.functional.normalize(members.mean(0), dim=0)
        out[i] = C * o.router_std * math.sqrt(D)
    return out


# ---------------------------------------------------------------- plan and write


def output_format(src: DenseSource, o: UpcycleOptions) -> str:
    """auto: the matching Hugging Face MoE family for a Hugging Face source, moecli's own format otherwise."""
    if o.format != "auto":
        return o.format
    return HF_OUT[src.hf_type] if src.hf_type else "moecli"


def plan_moecli(recipe: Recipe, dtype: torch.dtype) -> list[tuple[str, torch.dtype, tuple]]:
    sd = meta_model(recipe).state_dict()
    if recipe.model.tie_embeddings:
        sd.pop("output.weight", None)
    return [(k, torch.float32 if k.endswith("expert_bias") else dtype, tuple(v.shape)) for k, v in sd.items()]


def plan_hf(recipe: Recipe, mt: str, dtype: torch.dtype) -> list[tuple[str, str, torch.dtype, tuple, tuple]]:
    """(hf_name, kind, dtype, shape, source) for every output tensor, in file order (layer by layer)."""
    shapes = {k: s for k, _, s in plan_moecli(recipe, dtype)}
    E, Fe, D = recipe.moe.num_experts, recipe.moe.expert_ffn, recipe.model.d_model
    first, per_layer, last = [], {i: [] for i in range(recipe.model.n_layers)}, []
    for ours, theirs in plain_name_map(recipe, mt).items():
        row = (theirs, "plain", dtype, shapes[ours], (ours,))
        if ours.startswith("layers."):
            per_layer[int(ours.split(".")[1])].append(row)
        else:
            (first if ours == "tok_embeddings.weight" else last).append(row)
    for i in recipe.moe_layer_indices():
        for e in range(E):
            n1, n3, n2 = expert_names(mt, i, e)
            per_layer[i] += [(n1, "expert", dtype, (Fe, D), (i, e, "w1")), (n3, "expert", dtype, (Fe, D), (i, e, "w3")),
                             (n2, "expert", dtype, (D, Fe), (i, e, "w2"))]
        per_layer[i] += [(name, "zero", dtype, shape, ()) for name, shape in FAMILIES[mt].empty_tensors(recipe, i)]
    return first + [row for i in sorted(per_layer) for row in per_layer[i]] + last


@dataclass
class UpcyclePlan:
    """What an upcycle will write, settled before anything is: the sources, the output format and recipe, every
    tensor (name, how it is made, dtype, shape, its parts) and the shards they go to."""
    src: DenseSource
    experts: list  # DenseSource of each --expert (none: every expert from SOURCE's FFN)
    fmt: str
    recipe: Recipe
    tensors: list
    shards: list
    inexact: list[str]  # why the conversion does not preserve the dense function (none: it does)
    several: bool  # experts from other models than SOURCE: no single dense function to preserve

    def report(self, o: UpcycleOptions, output: Path | None, dry_run: bool) -> dict:
        src, dtype = self.src, self.src.dtype
        out_bytes = sum(nbytes(dt, s) for _, _, dt, s, _ in self.tensors)
        # peak: the dense FFN of one layer (cached) + the largest tensor being produced (+ its per-expert parts)
        ffn_bytes = 3 * nbytes(dtype, (src.recipe.model.ffn_dim, src.recipe.model.d_model))
        largest = max(nbytes(dt, s) for _, _, dt, s, _ in self.tensors)
        result = {
            "source": str(src.dir), "source_format": src.hf_type or "moecli",
            "output": str(output) if output else None, "format": self.fmt, "recipe": self.recipe.name,
            "moe_layers": self.recipe.moe_layer_indices(), "num_experts": o.num_experts, "top_k": o.top_k,
            "granularity": o.granularity, "shared_experts": o.shared_experts, "router_init": o.router_init,
            "tensors": len(self.tensors), "shards": len(self.shards), "input_bytes": src.tensors.total_bytes(),
            "output_bytes": out_bytes, "memory_estimate_bytes": ffn_bytes + 2 * largest,
            "exact": not self.inexact and not self.several, "inexact_reasons": self.inexact, "dry_run": dry_run,
            "expert_sources": [str(x.dir) for x in self.experts],
        }
        if dry_run:
            result["plan"] = [{"name": n, "shape": list(s), "dtype": dtype_name(dt)} for n, _, dt, s, _ in self.tensors]
        return result


def upcycle(source: str, output: Path | None, o: UpcycleOptions, dry_run: bool = False, force: bool = False,
            allow_inexact: bool = False, verify: bool = True, progress=None) -> dict:
    """Plan the conversion, then (unless dry_run) write it into OUT atomically and verify it there."""
    p = plan(source, o)
    result = p.report(o, output, dry_run)
    if dry_run:
        return result
    if p.inexact and not allow_inexact:
        raise UserError("this conversion is not function-preserving: " + "; ".join(p.inexact) +
                        " (pass --allow-inexact to convert anyway)")
    if output is None:
        raise UserError("-o/--output: required (or use --dry-run)")
    output = Path(output)
    if output.resolve() == p.src.dir.resolve() or p.src.dir.resolve() in output.resolve().parents:
        raise UserError(f"{output}: must not be the input checkpoint or inside it")
    prod = Producer(p.src, p.recipe, o, make_router_rows(p.src, p.recipe, o), p.experts)
    t0 = time.perf_counter()
    with output_lock(Path(output)), atomic_dir(output, overwrite=force) as tmp:
        write(p, prod, o, tmp, progress)
        result["seconds"] = time.perf_counter() - t0
        if verify:
            result.update(check(p, tmp))
    return result


def plan(source: str, o: UpcycleOptions) -> UpcyclePlan:
    """The options checked, the sources read (headers only), the output's recipe and every tensor it holds."""
    try:  # idempotent: resolves the defaults that depend on other options (num_experts, router_init)
        o.validate()
    except FieldError as e:
        raise UserError(f"upcycle options: {e.field_name}: {e.msg}") from None
    src = DenseSource(source)
    fmt = output_format(src, o)
    recipe = moe_recipe(src.recipe, o)
    if fmt != "moecli":
        check_writable(recipe, fmt, "write the moecli format instead (--format moecli)")
    experts = [DenseSource(x.source) for x in o.experts]
    for x in experts:
        x.check_ffn_like(src, recipe.moe_layer_indices())
    several = any(x.dir.resolve() != src.dir.resolve() for x in experts)  # experts not all the base's FFN
    inexact = analyse_exactness(o, fmt)
    if fmt == "moecli":
        tensors = [(k, "moecli", dt, s, (k,)) for k, dt, s in plan_moecli(recipe, src.dtype)]
    else:
        tensors = plan_hf(recipe, fmt, src.dtype)
    shards = _assign_shards(tensors, int(o.shard_size_mb * 2**20)) if fmt != "moecli" else [tensors]
    return UpcyclePlan(src, experts, fmt, recipe, tensors, shards, inexact, several)


def write(p: UpcyclePlan, prod: Producer, o: UpcycleOptions, tmp: Path, progress=None) -> None:
    """Every tensor of the plan made by ``prod`` and written into ``tmp``, one at a time."""
    if p.fmt == "moecli":
        _write_moecli(tmp, p.tensors, prod, p.recipe, p.src, o, progress)
    else:
        _write_hf(tmp, p.shards, prod, p.recipe, p.fmt, p.src, progress)


def check(p: UpcyclePlan, tmp: Path) -> dict:
    """The written model against its dense source on the probe, one layer of each at a time (verify.compare);
    with several sources, each layer against each source's own model. A conversion that should be exact and
    is not fails (nothing is written)."""
    if p.several:  # no single dense function: each layer against each source's own model
        unique = list(dict.fromkeys(x.dir for x in p.experts))
        rep = compare(tmp, unique, probe_tokens(p.recipe))
        return {"verified": ("several sources: no single dense function to preserve; per_source_layer_diff "
                             "is each layer's max |hidden-state difference| / max |source's| on the probe, "
                             "each model on its own hidden states"),
                "per_source_layer_diff": {str(d): [row[j] for row in rep["per_layer"]] for j, d in enumerate(unique)}}
    rep = compare(tmp, [p.src.dir], probe_tokens(p.recipe))
    diff, scale = rep["max_abs_logit_diff"], rep["max_abs_logit"]
    if not p.inexact and not diff <= 1e-4 * max(1.0, scale):
        raise RunFailed(f"upcycled model differs from the dense model by {diff:.3g} (max |logit| "
                        f"difference) although the options should preserve it; nothing was written")
    return {"max_abs_logit_diff": diff,
            "verified": "max |logit difference| against the dense model on the probe, layer by layer"}


def _assign_shards(plan, limit):
    names = [row[0] for row in plan]
    rows = dict(zip(names, plan))
    return [[rows[n] for n in shard] for shard in assign_shards(names, [nbytes(r[2], r[3]) for r in plan], limit)]


def _tick(progress, name):
    if progress:
        progress(name)


def _write_moecli(tmp: Path, plan, prod: Producer, recipe: Recipe, src: DenseSource, o: UpcycleOptions, progress):
    w = SafetensorsWriter(tmp / MODEL_FILE, [(n, dt, s) for n, _, dt, s, _ in plan], {"format": "pt"})
    for name, _, dt, s, _ in plan:
        w.write(name, prod.moecli_tensor(name).to(dt))
        _tick(progress, name)
    w.close()
    cfg = {"format": FORMAT, "version": VERSION, "recipe": recipe.to_dict(),
           "source": {"path": str(src.dir), "format": src.hf_type or "moecli", "upcycle": dataclasses.asdict(o)}}
    if src.tokenizer_cfg:
        cfg["tokenizer"] = src.tokenizer_cfg
    atomic_write_json(tmp / CONFIG_FILE, cfg)
    copy_files(src.dir, tmp, TOKENIZER_FILES)


def _write_hf(tmp: Path, shards, prod: Producer, recipe: Recipe, fmt: str, src: DenseSource, progress):
    weight_map = {}
    n = len(shards)
    for k, shard in enumerate(shards):
        fname = shard_file_name(k, n)
        w = SafetensorsWriter(tmp / fname, [(r[0], r[2], r[3]) for r in shard], {"format": "pt"})
        for name, kind, dt, shape, srcinfo in shard:
            if kind == "plain":
                t = prod.moecli_tensor(srcinfo[0])
            elif kind == "zero":
                t = torch.zeros(shape, dtype=dt)
            else:
                i, e, key = srcinfo
                t = prod.expert_weight(i, e, key)
            w.write(name, t.to(dt))
            weight_map[name] = fname
            _tick(progress, name)
        w.close()
    write_shard_index(tmp, weight_map, sum(nbytes(r[2], r[3]) for sh in shards for r in sh))
    cfg = hf_config_for(recipe, fmt, src.hf_config if src.hf_type else None)
    cfg["torch_dtype"] = cfg["dtype"] = str(prod.dtype).replace("torch.", "")
    atomic_write_json(tmp / "config.json", cfg)
    copy_files(src.dir, tmp, TOKENIZER_FILES)

