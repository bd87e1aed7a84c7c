"""A checkpoint's model one piece at a time: the embedding, each decoder block, the final norm and head, each
read from its safetensors files when asked for and freed when dropped.

safetensors serves a tensor from the file's mmap'd pages, which stay resident (and counted in the process's
RSS) while the file is open; a piece is read through a handle opened for it alone, so when the piece is dropped
its pages go too and memory holds about one block, not the model. ``upcycle`` verifies a conversion this way
(``compare``): the dense and the MoE model side by side, one layer of each at a time.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import CONFIG_FILE, FORMAT, MODEL_FILE, find_checkpoint_dir, read_config
from .config import recipe_from_dict
from .st_stream import LazyTensors


class LayerReader:
    """The model of a moecli checkpoint or Hugging Face directory, piece by piece, in ``dtype``."""

    def __init__(self, path: str | Path, dtype: torch.dtype = torch.float32):
        from .hf import plain_name_map, read_hf_config, recipe_from_hf

        self.dir, self.dtype = find_checkpoint_dir(path), dtype
        cfg = read_config(self.dir)
        self.mt = self.container = None
        if cfg.get("format") == FORMAT:
            self.recipe = recipe_from_dict(cfg.get("recipe"), str(self.dir / CONFIG_FILE) + " recipe")
            self.names = None
        else:
            hc = read_hf_config(self.dir)
            self.mt, self.container, self.hf_config = hc["model_type"], hc.get("_container"), hc
            self.recipe = recipe_from_hf(hc, str(self.dir / CONFIG_FILE))
            self.names = plain_name_map(self.recipe, self.mt)

    def _open(self) -> LazyTensors:
        from .hf import open_tensors

        if self.mt is None:
            return LazyTensors([self.dir / MODEL_FILE])
        return open_tensors(self.dir, self.hf_config)

    def tensors(self, ours: list[str]) -> dict[str, torch.Tensor]:
        """moecli-named tensors (a block's experts stacked as moecli holds them), through a handle of their own."""
        from .hf import _expert_stack

        src, out = self._open(), {}
        for name in ours:
            if name in out:
                continue
            if ".moe.experts." in name and self.mt is not None:
                i = int(name.split(".")[1])
                out |= {f"layers.{i}.moe.experts.{k}": v
                        for k, v in _expert_stack(src, self.mt, i, self.recipe.moe.num_experts, self.dtype,
                                          contiguous=False).items()}
            elif name.endswith("router.expert_bias") and self.mt is not None and self.names.get(name) is None:
                out[name] = torch.zeros(self.recipe.moe.num_experts)  # a family without aux-free biases
            else:
                out[name] = src.get(self.names[name] if self.names else name).to(self.dtype)
        return out

    def block(self, i: int):
        """Decoder block i, loaded, in eval mode."""
        from .model import meta_block

        blk = meta_block(self.recipe, i)
        keys = [f"layers.{i}.{k}" for k in blk.state_dict()]
        sd = self.tensors(keys)
        blk.load_state_dict({k[len(f"layers.{i}."):]: v for k, v in sd.items()}, strict=True, assign=True)
        return blk.eval()

    def embed(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding(tokens_BS, self.tensors(["tok_embeddings.weight"])["tok_embeddings.weight"])

    def head(self, x_BSD: torch.Tensor) -> torch.Tensor:
        """Logits: the final norm and the output projection (the embedding, when tied)."""
        from .attention import RMSNorm

        out = "tok_embeddings.weight" if self.recipe.model.tie_embeddings else "output.weight"
        t = self.tensors(["norm.weight", out])
        norm = RMSNorm(x_BSD.shape[-1], self.recipe.model.norm_eps)
        norm.weight = torch.nn.Parameter(t["norm.weight"], requires_grad=False)
        return norm(x_BSD) @ t[out].t()

    def rope(self, S: int):
        from .rope import cos_sin

        return cos_sin(self.recipe.model, S)


@torch.no_grad()
def compare(moe_path: str | Path, references: list[str | Path], tokens_BS: torch.Tensor) -> dict:
    """The MoE model against reference models (same depth and width) on the same tokens, one layer of each in
    memory at a time: per layer, each reference's relative hidden-state difference (max |diff| / max |reference|
    after the layer, each model on its own hidden states), and the logits' max |difference| against the first
    reference with that reference's max |logit|."""
    moe = LayerReader(moe_path)
    refs = [LayerReader(p) for p in references]
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
