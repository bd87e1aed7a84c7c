"""``--train-experts``: fine-tune only the routed experts a task uses (DeepSeek's ESFT, arXiv 2407.01906); the
attention, embeddings, norms, routers, shared experts, dense FFNs and the other experts stay frozen.

    top-p:P              per MoE layer, the experts with the largest gate share on DATA (each expert's summed
                         renormalised top-k gates, moe/saliency.py, over all of them: ESFT-Gate), taken from the
                         largest down until their shares add up to P; from one routing pass over DATA's first
                         SELECTION_TOKENS tokens before training
    LAYER:E,E;LAYER:E    the experts named, per MoE layer (a layer not named trains none)

The selection is printed, kept in the run's checkpoint (config.json "train_experts") and taken up again by
--resume. Checkpoints and exports keep their format: the trained rows are merged into the stored expert tensors
(GroupedExperts.train_only).
"""

from __future__ import annotations

import torch

from moecli.errors import UserError
from moecli.model.params import param_counts
from moecli.moe.saliency import ExpertSaliency

SELECTION_TOKENS = 65536  # DATA tokens the top-p routing pass reads


def parse_spec(spec: str, recipe) -> float | dict[int, list[int]]:
    """--train-experts SPEC: the share P of ``top-p:P``, or an explicit {layer: experts} (each checked against the
    model's MoE layers and expert count)."""
    where = f"--train-experts {spec}"
    if spec.startswith("top-p:"):
        try:
            p = float(spec[len("top-p:"):])
        except ValueError:
            p = float("nan")
        if not 0 < p <= 1:
            raise UserError(f"{where}: top-p:P needs P in (0, 1] (the gate share the chosen experts reach)")
        return p
    layers, E = recipe.moe_layer_indices(), recipe.moe.num_experts
    selection: dict[int, list[int]] = {}
    for part in filter(None, (s.strip() for s in spec.split(";"))):
        layer, colon, experts = part.partition(":")
        try:
            i, chosen = int(layer), sorted({int(e) for e in experts.split(",") if e.strip()})
        except ValueError:
            i, chosen = None, []
        if not colon or i is None or not chosen:
            raise UserError(f"{where}: expected top-p:P or LAYER:E,E;LAYER:E (e.g. 1:0,5;3:2), got {part!r}")
        if i not in layers:
            raise UserError(f"{where}: layer {i} is not an MoE layer (MoE layers: {', '.join(map(str, layers))})")
        if i in selection:
            raise UserError(f"{where}: layer {i} is named twice")
        if chosen[0] < 0 or chosen[-1] >= E:
            bad = chosen[-1] if chosen[-1] >= E else chosen[0]
            raise UserError(f"{where}: layer {i}: experts are 0 to {E - 1}, got {bad}")
        selection[i] = chosen
    if not selection:
        raise UserError(f"{where}: names no expert")
    return selection


@torch.no_grad()
def saliency_pass(model, batches: list[torch.Tensor]) -> dict[int, ExpertSaliency]:
    """{MoE layer: ExpertSaliency} of the model's own forwards over ``batches`` (token ids, B x S each)."""
    device = next(model.parameters()).device
    layers = dict(model.moe_layers)
    sal = {i: ExpertSaliency(layer.cfg.num_experts) for i, layer in layers.items()}
    was_training = model.training
    model.eval()
    try:
        for i, layer in layers.items():
            layer.saliency = sal[i]
        for x in batches:
            model(x.to(device))
    finally:
        for layer in layers.values():
            layer.saliency = None
        model.train(was_training)
    return sal


def top_p(sal: dict[int, ExpertSaliency], p: float) -> dict[int, list[int]]:
    """Per layer, the fewest experts (largest gate share first, ties by index) whose shares add up to p."""
    out = {}
    for i, s in sorted(sal.items()):
        gate = s.sums_4E[1]
        share = gate / gate.sum().clamp_min(1e-30)
        order = sorted(range(s.E), key=lambda e: (-float(share[e]), e))
        chosen, total = [], 0.0
        for e in order:
            chosen.append(e)
            total += float(share[e])
            if total >= p - 1e-12:
                break
        out[i] = sorted(chosen)
    return out


def select(spec: str, model, tokens: torch.Tensor, seq_len: int, batch: int = 8) -> dict[int, list[int]]:
    """The experts each MoE layer trains: SPEC's list, or top-p's from a routing pass over ``tokens``."""
    chosen = parse_spec(spec, model.recipe)
    if isinstance(chosen, dict):
        return chosen
    n = tokens.numel() // seq_len
    if n < 1:
        raise UserError(f"--train-experts {spec}: DATA has {tokens.numel()} tokens; the routing pass needs at "
                        f"least one window of {seq_len} (train.seq_len)")
    windows = tokens[: n * seq_len].view(n, seq_len).long()
    return top_p(saliency_pass(model, list(windows.split(batch))), chosen)


def train_only(model, selection: dict[int, list[int]]) -> None:
    """Freeze every parameter, then let the selected experts of each MoE layer train (GroupedExperts.train_only)."""
    for p in model.parameters():
        p.requires_grad_(False)
    layers = dict(model.moe_layers)
    for i, experts in selection.items():
        layers[i].experts.train_only(experts)


def trainable_parameters(recipe, selection: dict[int, list[int]]) -> int:
    """The parameters that train under ``selection``: the chosen experts' weights (and biases)."""
    m = recipe.moe
    per_expert = param_counts(recipe)[1] // max(1, m.num_experts * len(recipe.moe_layer_indices()))
    return per_expert * sum(len(v) for v in selection.values())


def to_spec(selection: dict[int, list[int]]) -> str:
    """The selection as an explicit SPEC (LAYER:E,E;...), as --nproc's ranks and a resumed run take it up."""
    return ";".join(f"{i}:{','.join(map(str, v))}" for i, v in sorted(selection.items()))


def describe(selection: dict[int, list[int]], num_experts: int) -> str:
    return "; ".join(f"layer {i}: {', '.join(map(str, v))} ({len(v)} of {num_experts})"
                     for i, v in sorted(selection.items()))
