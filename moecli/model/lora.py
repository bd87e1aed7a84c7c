"""LoRA (Hu et al. 2021) as peft computes it: a frozen weight W plus a trained low-rank product scaled by alpha / r.

    linear layers      y = x W^T + (x A^T) B^T x scale, A (r, in), B (out, r): peft's lora_A / lora_B, added to
                       the layer's output by a forward hook (the layer itself untouched)
    routed experts     per expert, one pair over gate and up together (D -> 2F) and one over down (F -> D),
                       merged into the experts' weights once per forward (moe/experts.py: ExpertLoRA), so the
                       grouped expert path runs as it does without adapters

Targets (--lora-targets): attention (every projection of an attention or linear-attention block), experts (the
routed ones), shared (shared experts), dense (dense FFNs), router (the router's gate). The adapters train, in
float32; everything else is frozen, and may be held in bfloat16 (--base-dtype).

A run saves its adapters alone (ADAPTER_FILE, moecli's names) with LoRAConfig and the base's directory in its
config.json; ``merge`` folds them into the weights for eval, generate, inspect-routing and export.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from moecli.errors import UserError
from moecli.model.transformer import meta_model
from moecli.moe.experts import ExpertLoRA, GroupedExperts

ADAPTER_FILE = "adapter.safetensors"
TARGETS = ("attention", "experts", "shared", "dense", "router")
DEFAULT_TARGETS = ("attention", "experts", "shared", "dense")  # the router frozen, as unsloth and torchtune do
LORA_LR = 2e-4  # about ten times a full fine-tune's (training/setup.py: FINETUNE_LR)


@dataclass
class LoRAConfig:
    rank: int
    alpha: float  # the adapters' product is scaled by alpha / rank
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    base: str = ""  # the directory of the checkpoint the adapters apply to (--init)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "LoRAConfig":
        try:
            cfg = cls(int(d["rank"]), float(d["alpha"]), list(d["targets"]), str(d["base"]))
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{where}: lora: must hold rank, alpha, targets and base") from None
        check_targets(cfg.targets, where + ": lora.targets")
        return cfg


def parse_targets(text: str | None) -> list[str]:
    """--lora-targets attention,experts,... (None: the defaults)."""
    if text is None:
        return list(DEFAULT_TARGETS)
    targets = [t.strip() for t in text.split(",") if t.strip()]
    check_targets(targets, "--lora-targets")
    return targets


def check_targets(targets: list[str], where: str) -> None:
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise UserError(f"{where}: each of {', '.join(TARGETS)}, comma-separated; got {bad[0] if bad else 'none'}")


def target_of(name: str, module: nn.Module) -> str | None:
    """Which target a module of the Transformer belongs to (None: never adapted: embeddings, the head, norms, the
    shared experts' one-wide gate)."""
    if isinstance(module, GroupedExperts):
        return "experts"
    if not isinstance(module, nn.Linear) or not name.startswith("layers."):
        return None
    part = name.split(".")[2]
    if part == "attention":
        return "attention"
    if part == "feed_forward":
        return "dense"
    if ".moe.shared." in name:
        return "shared"
    if name.endswith(".moe.router.gate"):
        return "router"
    return None


class LinearLoRA(nn.Module):
    """The low-rank pair of one nn.Linear (its child ``lora``), peft's layout and initialisation."""

    def __init__(self, in_features: int, out_features: int, r: int, scale: float,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.scale = scale
        self.lora_A = nn.Parameter((torch.rand(r, in_features, generator=generator) * 2 - 1) / math.sqrt(in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(self.lora_A.dtype) @ self.lora_A.t()) @ self.lora_B.t() * self.scale

    def delta(self) -> torch.Tensor:
        """What the pair adds to the layer's weight (out, in)."""
        return self.lora_B @ self.lora_A * self.scale


def _add_term(module: nn.Linear, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return output + module.lora(inputs[0]).to(output.dtype)


def adapted(model, targets: list[str]) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module the targets adapt."""
    return [(n, m) for n, m in model.named_modules() if target_of(n, m) in targets]


def check_rank(model, cfg: LoRAConfig) -> None:
    """A rank of at least 1 and at most every adapted layer's narrower side; at least one layer adapted."""
    if cfg.rank < 1:
        raise UserError(f"--lora: the rank must be >= 1, got {cfg.rank}")
    mods = adapted(model, cfg.targets)
    if not mods:
        raise UserError(f"--lora-targets {','.join(cfg.targets)}: the model has none of these layers")
    for name, m in mods:
        width = min(m.d_model, m.hidden) if isinstance(m, GroupedExperts) else min(m.in_features, m.out_features)
        if cfg.rank > width:
            raise UserError(f"--lora {cfg.rank}: above the width of {name} ({width}); give a rank <= {width} or "
                            f"leave {target_of(name, m)} out of --lora-targets")


def add_lora(model, cfg: LoRAConfig, seed: int) -> int:
    """Freeze the model and give every targeted layer its adapters (seeded); returns the adapters' parameters."""
    check_rank(model, cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    n = 0
    for _, m in adapted(model, cfg.targets):
        if isinstance(m, GroupedExperts):
            m.lora = ExpertLoRA(m.num_experts, m.d_model, m.hidden, cfg.rank, cfg.scale, g).to(m.w1_EDF.device)
        else:
            m.lora = LinearLoRA(m.in_features, m.out_features, cfg.rank, cfg.scale, g).to(m.weight.device)
            m.lora_hook = m.register_forward_hook(_add_term)
        n += sum(p.numel() for p in m.lora.parameters())
    return n


def adapter_state(model) -> dict[str, torch.Tensor]:
    """The adapters' tensors under their names in the model (what a LoRA run's checkpoint holds)."""
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if ".lora." in k}


def load_adapters(model, sd: dict[str, torch.Tensor], where) -> None:
    """A saved adapter_state into a model given the same adapters (add_lora): names and shapes checked."""
    want = {k: tuple(v.shape) for k, v in adapter_state(model).items()}
    missing, extra = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    if missing or extra:
        raise UserError(f"{where}: {'misses ' + missing[0] if missing else 'holds ' + extra[0] + ', not'} an adapter "
                        f"of this model's LoRA")
    for k, shape in want.items():
        if tuple(sd[k].shape) != shape or not torch.isfinite(sd[k]).all():
            raise UserError(f"{where}: {k} has shape {tuple(sd[k].shape)} (or NaN/inf values); expected {shape}")
    model.load_state_dict(sd, strict=False)


@torch.no_grad()
def merge(model) -> None:
    """Fold every adapter into its weights (in float32, then the weight's dtype) and drop it: a plain model."""
    for m in list(model.modules()):
        lora = getattr(m, "lora", None)
        if lora is None:
            continue
        if isinstance(m, GroupedExperts):
            for name, d in zip(("w1_EDF", "w3_EDF", "w2_EFD"), lora.deltas()):
                w = getattr(m, name)
                w.copy_((w.float() + d.float()).to(w.dtype))
        else:
            m.weight.copy_((m.weight.float() + lora.delta().float()).to(m.weight.dtype))
            m.lora_hook.remove()
            del m.lora_hook
        m.lora = None
        if isinstance(m, nn.Linear):
            del m.lora


def lora_parameters(recipe, cfg: LoRAConfig) -> int:
    """The adapters' parameter count for ``recipe`` (a meta model: nothing allocated)."""
    model = meta_model(recipe)
    r, n = cfg.rank, 0
    for _, m in adapted(model, cfg.targets):
        if isinstance(m, GroupedExperts):
            n += m.num_experts * r * (m.d_model + 2 * m.hidden + m.hidden + m.d_model)
        else:
            n += r * (m.in_features + m.out_features)
    return n
