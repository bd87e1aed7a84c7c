"""A checkpoint's model one piece at a time: the embedding, each decoder block, the final norm and head, each
read from its safetensors files when asked for and freed when dropped.

safetensors serves a tensor from the file's mmap'd pages, which stay resident (and counted in the process's
RSS) while the file is open; a piece is read through a handle opened for it alone, so when the piece is dropped
its pages go too and memory holds about one block, not the model. ``upcycle`` verifies a conversion this way
(commands/verify.py): the dense and the MoE model side by side, one layer of each at a time. ``moe eval`` and ``moe
inspect-routing`` run a model that does not fit in memory (or with ``--stream``) the same way (``stream_forward``):
each block is read once and every batch's hidden states, kept in a file, pass through it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from moecli.formats import hf
from moecli.formats.native import MODEL_FILE
from moecli.model.norm import RMSNorm
from moecli.model.params import param_counts, recipe_parameter_report
from moecli.model.rope import cos_sin
from moecli.model.transformer import meta_block
from moecli.moe.saliency import ExpertSaliency
from moecli.parallel import device
from moecli.fileio import byte_view, read_exact
from moecli.formats.st_stream import LazyTensors


def open_stored(directory: Path, hf_config: dict | None) -> LazyTensors:
    """A checkpoint's stored tensors, read when asked for: a moecli checkpoint's model.safetensors, or a Hugging Face
    directory's files under its family's names (hf.open_tensors; ``hf_config``: hf.family_config's)."""
    if hf_config is None:
        return LazyTensors([Path(directory) / MODEL_FILE])
    return hf.open_tensors(directory, hf_config)


class LayerReader:
    """The model of a checkpoint (formats.checkpoint.Checkpoint.reader), piece by piece, in ``dtype``: a moecli
    checkpoint's tensors under their own names, a Hugging Face directory's (``hf_config``) under its family's."""

    def __init__(self, directory: Path, recipe, hf_config: dict | None, dtype: torch.dtype = torch.float32):
        self.dir, self.recipe, self.hf_config, self.dtype = Path(directory), recipe, hf_config, dtype
        self.mt = hf_config["model_type"] if hf_config is not None else None
        self.names = hf.plain_name_map(recipe, self.mt) if hf_config is not None else None

    def _open(self) -> LazyTensors:
        return open_stored(self.dir, self.hf_config)

    def tensors(self, ours: list[str]) -> dict[str, torch.Tensor]:
        """moecli-named tensors (a block's experts stacked as moecli holds them), through a handle of their own."""
        src, out = self._open(), {}
        for name in ours:
            if name in out:
                continue
            if ".moe.experts." in name and self.mt is not None:
                i = int(name.split(".")[1])
                out |= {f"layers.{i}.moe.experts.{k}": v
                        for k, v in hf.expert_stack(src, self.mt, i, self.recipe.moe.num_experts, self.dtype,
                                                    contiguous=False).items()}
            elif name.endswith("router.expert_bias") and self.mt is not None and self.names.get(name) is None:
                out[name] = torch.zeros(self.recipe.moe.num_experts)  # a family without aux-free biases
            else:
                out[name] = src.get(self.names[name] if self.names else name).to(self.dtype)
        return out

    def block(self, i: int):
        """Decoder block i, loaded, in eval mode."""
        blk = meta_block(self.recipe, i)
        keys = [f"layers.{i}.{k}" for k in blk.state_dict()]
        sd = self.tensors(keys)
        blk.load_state_dict({k[len(f"layers.{i}."):]: v for k, v in sd.items()}, strict=True, assign=True)
        return blk.eval()

    def embed(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding(tokens_BS, self.tensors(["tok_embeddings.weight"])["tok_embeddings.weight"])

    def head_weights(self) -> dict[str, torch.Tensor]:
        """The final norm's weight and the output projection (the embedding, when tied), for ``head``."""
        out = "tok_embeddings.weight" if self.recipe.model.tie_embeddings else "output.weight"
        t = self.tensors(["norm.weight", out])
        return {"norm": t["norm.weight"], "output": t[out]}

    def head(self, x_BSD: torch.Tensor, weights: dict | None = None) -> torch.Tensor:
        """Logits: the final norm and the output projection (``weights``: head_weights(), read once for many)."""
        w = weights or self.head_weights()
        norm = RMSNorm(x_BSD.shape[-1], self.recipe.model.norm_eps, self.recipe.model.norm_zero_centered)
        norm.weight = torch.nn.Parameter(w["norm"], requires_grad=False)
        return norm(x_BSD) @ w["output"].t()

    def rope(self, S: int):
        return cos_sin(self.recipe.model, S)


# ---------------------------------------------------------------- layer streaming (eval, inspect-routing)


class HiddenStore:
    """Hidden states of many batches in a temporary file, each batch read and written whole with pread / pwrite:
    not mmap'd, so they stay out of the process's memory (the page cache holds what it can; the kernel may drop
    it)."""

    def __init__(self, path: Path, shapes: list[tuple], dtype: torch.dtype = torch.float32):
        self.shapes, self.dtype = shapes, dtype
        self.offsets = [0]
        for s in shapes:
            self.offsets.append(self.offsets[-1] + math.prod(s) * dtype.itemsize)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)

    def put(self, b: int, t: torch.Tensor) -> None:
        view, done = byte_view(t.detach().to(self.dtype).contiguous()), 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], self.offsets[b] + done)

    def get(self, b: int) -> torch.Tensor:
        t = torch.empty(self.shapes[b], dtype=self.dtype)
        if not read_exact(self.fd, byte_view(t), self.offsets[b]):
            raise OSError("hidden-state file shorter than written")
        return t

    def close(self) -> None:
        os.close(self.fd)


def stream_plan(recipe, dtype: torch.dtype, batch_tokens: int) -> dict:
    """What layer streaming needs: the largest piece's weights (a block, or the embedding / head) and an estimate of
    the peak: that piece, one batch's activations (its hidden states a few times over, an MoE's token copies,
    the logits) and the process itself."""
    rep = recipe_parameter_report(recipe)
    item = dtype.itemsize
    m = recipe.model
    largest = max([row["total"] for row in rep["layers"]] + [m.vocab_size * m.d_model]) * item
    k = max(1, recipe.moe.top_k) if recipe.moe.num_experts else 1
    hidden = max(m.d_model, m.ffn_dim, recipe.moe.expert_ffn * k if recipe.moe.num_experts else 0, m.n_heads * m.hd)
    activations = batch_tokens * (8 * m.d_model + 4 * hidden * k + 2 * m.vocab_size) * 4
    return {"largest_piece_bytes": largest, "activation_bytes": activations,
            "expected_peak_bytes": largest + activations + PROCESS_BYTES}


PROCESS_BYTES = 400 * 2**20  # python, torch and moecli themselves, measured at about 0.35-0.4 GB


@torch.no_grad()
def stream_forward(reader: LayerReader, batches: list[torch.Tensor], tmp: Path, on_moe=None,
                   saliency: dict[int, ExpertSaliency] | None = None):
    """Logits of each batch (B x S token ids, one S for all), computed layer by layer: each decoder block is read
    once, every batch's hidden states (kept in a file under ``tmp``) pass through it, and it is freed before the
    next. ``on_moe(layer, b, route)`` sees each MoE layer's routing of batch b; ``saliency[layer]``, where given,
    sums its experts' saliency (MoELayer.saliency). Yields (b, logits_BSV)."""
    S = batches[0].shape[1]
    D = reader.recipe.model.d_model
    store = HiddenStore(Path(tmp) / "hidden.bin", [(x.shape[0], S, D) for x in batches])
    try:
        cos, sin = reader.rope(S)
        emb = reader.tensors(["tok_embeddings.weight"])["tok_embeddings.weight"]
        for b, x in enumerate(batches):
            store.put(b, torch.nn.functional.embedding(x, emb))
        del emb
        for i in range(reader.recipe.model.n_layers):
            blk = reader.block(i)
            if blk.is_moe:
                blk.moe.capture = on_moe is not None
                blk.moe.saliency = None if saliency is None else saliency[i]
            for b in range(len(batches)):
                h = blk(store.get(b).to(reader.dtype), cos, sin)
                if blk.is_moe and on_moe is not None:
                    on_moe(i, b, blk.moe.last_route)
                store.put(b, h)
            del blk
        head = reader.head_weights()
        for b in range(len(batches)):
            yield b, reader.head(store.get(b).to(reader.dtype), head)
    finally:
        store.close()


def why_stream(recipe, dtype: torch.dtype, stream: bool) -> str | None:
    """Why a run reads its layers one at a time: --stream, or weights larger than the memory available (said in
    the output); None: load the model whole."""
    if stream:
        return "--stream"
    need = param_counts(recipe)[0] * dtype.itemsize
    avail = device.available_memory()
    if avail is not None and need > avail:
        return f"its {need / 2**30:,.1f} GiB of weights exceed the {avail / 2**30:,.1f} GiB of memory available"
    return None
