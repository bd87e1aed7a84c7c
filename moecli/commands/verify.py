"""Checking a conversion (upcycle, export): the new model against the one it came from, on a seeded random probe.
``probe_logits`` runs a whole model; ``compare`` runs two or more side by side one layer of each at a time
(formats/layerwise.py), so a conversion of a model bigger than memory is checked too."""

from __future__ import annotations

from pathlib import Path

import torch

from moecli.config import Recipe
from moecli.formats.checkpoint import open_checkpoint


PROBE_LEN = 32


def probe_tokens(recipe: Recipe) -> torch.Tensor:
    """The seeded random probe input: 2 x min(PROBE_LEN, context) tokens."""
    r = recipe.model
    return torch.randint(0, r.vocab_size, (2, min(PROBE_LEN, r.context)), generator=torch.Generator().manual_seed(1234))


@torch.no_grad()
def probe_logits(model) -> torch.Tensor:
    """Logits of a model (in float32, eval mode) on a seeded random probe input."""
    model.float().eval()
    return model(probe_tokens(model.recipe)).logits_BSV


@torch.no_grad()
def compare(moe_path: str | Path, references: list[str | Path], tokens_BS: torch.Tensor) -> dict:
    """The MoE model against reference models (same depth and width) on the same tokens, one layer of each in
    memory at a time: per layer, each reference's relative hidden-state difference (max |diff| / max |reference|
    after the layer, each model on its own hidden states), and the logits' max |difference| against the first
    reference with that reference's max |logit|."""
    moe = open_checkpoint(moe_path).reader()
    refs = [open_checkpoint(p).reader() for p in references]
    S = tokens_BS.shape[1]
    cos, sin = moe.rope(S)
    ref_rope = [r.rope(S) for r in refs]
    h = moe.embed(tokens_BS)
    hs = [r.embed(tokens_BS) for r in refs]
    per_layer = []
    for i in range(moe.recipe.model.n_layers):
        blk = moe.block(i)
        h = blk(h, cos, sin)
        del blk
        row = []
        for j, r in enumerate(refs):
            blk = r.block(i)
            hs[j] = blk(hs[j], *ref_rope[j])
            del blk
            row.append(float((h - hs[j]).abs().max() / hs[j].abs().max().clamp_min(1e-30)))
        per_layer.append(row)
    logits, ref_logits = moe.head(h), refs[0].head(hs[0])
    return {"per_layer": per_layer, "max_abs_logit_diff": float((logits - ref_logits).abs().max()),
            "max_abs_logit": float(ref_logits.abs().max())}
