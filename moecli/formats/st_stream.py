"""Streaming safetensors: read tensors lazily, write them one at a time.

The safetensors format is an 8-byte little-endian header length, a JSON header
(name -> dtype, shape, byte offsets), then the raw tensor bytes. Knowing every
tensor's name, dtype and shape up front, ``SafetensorsWriter`` writes the header
first and then each tensor as it is produced, so a converter holds one tensor
in memory at a time, never the whole file.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from moecli.errors import UserError
from moecli.fileio import byte_view, read_exact, read_json_object
from moecli.formats.quant import fp8_dequant

DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def nbytes(dtype: torch.dtype, shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


def write_tensor(f, t: torch.Tensor) -> None:
    """Write a tensor's bytes to a binary file without an intermediate copy."""
    t = t.detach().cpu().contiguous()
    if t.numel():
        f.write(byte_view(t))


class SafetensorsWriter:
    """Write ``plan`` = [(name, dtype, shape), ...] to ``path``, tensors supplied in plan order."""

    def __init__(self, path: Path, plan: list[tuple[str, torch.dtype, tuple]], metadata: dict | None = None):
        self.path = Path(path)
        self.plan = list(plan)
        header, offset = {}, 0
        for name, dtype, shape in self.plan:
            size = nbytes(dtype, shape)
            header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        self.f = open(self.path, "wb")
        self.f.write(struct.pack("<Q", len(raw)))
        self.f.write(raw)
        self.i = 0

    def write(self, name: str, t: torch.Tensor) -> None:
        exp_name, dtype, shape = self.plan[self.i]
        if name != exp_name or t.dtype != dtype or tuple(t.shape) != tuple(shape):
            raise AssertionError(f"tensor {name} {t.dtype} {tuple(t.shape)} != plan {exp_name} {dtype} {shape}")
        size = nbytes(dtype, shape)
        if size:
            write_tensor(self.f, t)
        self.i += 1

    def close(self) -> None:
        if self.i != len(self.plan):
            self.f.close()
            raise AssertionError(f"{self.path}: wrote {self.i} of {len(self.plan)} tensors")
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


class LazyTensors:
    """Tensors of one or many safetensors files, read one at a time on demand."""

    def __init__(self, files: list[Path]):
        self.where: dict[str, Path] = {}
        self.stored: dict[str, str] = {}  # a name under rename_prefixes -> the file's own name for it
        self.fp8_block: tuple[int, int] | None = None  # fp8 checkpoints: get() dequantizes (quant.py)
        self.handles = {}
        for f in files:
            try:
                h = safe_open(str(f), "pt")
            except (SafetensorError, OSError) as e:
                raise UserError(f"{f}: not a readable safetensors file: {e}") from None
            self.handles[f] = h
            for k in h.keys():
                self.where[k] = f

    @classmethod
    def from_dir(cls, directory: Path) -> "LazyTensors":
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = read_json_object(index, "safetensors index").get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise UserError(f"{index}: weight_map: must map tensor names to shard file names")
            files = sorted({directory / v for v in weight_map.values()})
            missing = [f for f in files if not f.is_file()]
            if missing:
                raise UserError(f"{missing[0]}: shard listed in {index.name} is missing")
        else:
            files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise UserError(f"{directory}: no *.safetensors weights (pickled .bin checkpoints are not read)")
        return cls(files)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def keys(self):
        return self.where.keys()

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise UserError(f"tensor {name} not found in the checkpoint")
        t = self.handles[self.where[name]].get_tensor(self.stored.get(name, name))
        if self.fp8_block and t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            if f"{name}_scale_inv" not in self.where:
                raise UserError(f"tensor {name}: float8 without {name}_scale_inv")
            scale = self.handles[self.where[f"{name}_scale_inv"]].get_tensor(self.stored.get(f"{name}_scale_inv",
                                                                                             f"{name}_scale_inv"))
            R, C = t.shape
            br, bc = self.fp8_block
            if tuple(scale.shape) != (-(-R // br), -(-C // bc)):
                raise UserError(f"tensor {name}_scale_inv: shape {tuple(scale.shape)}, expected "
                                f"{(-(-R // br), -(-C // bc))} for {(R, C)} in blocks of {self.fp8_block}")
            return fp8_dequant(t, scale, self.fp8_block, torch.float32)
        return t

    def rename_prefixes(self, prefixes: dict[str, str]) -> "LazyTensors":
        """Read tensors whose names start with a key of ``prefixes`` under that prefix's value instead (a
        multimodal checkpoint's language model: language_model.model.layers... as model.layers...); the
        others are left out."""
        where, stored = {}, {}
        for name, f in self.where.items():
            for old, new in prefixes.items():
                if name.startswith(old):
                    ours = new + name[len(old):]
                    where[ours], stored[ours] = f, self.stored.get(name, name)
                    break
        self.where, self.stored = where, stored
        return self

    def _header(self, f: Path) -> tuple[dict, int]:
        """(the file's safetensors header, where its data starts), read once per file."""
        cache = self.__dict__.setdefault("_headers", {})
        if f not in cache:
            with open(f, "rb") as fh:
                n = struct.unpack("<Q", fh.read(8))[0]
                cache[f] = (json.loads(fh.read(n)), 8 + n)
        return cache[f]

    def stack(self, names: list[str], dtype: torch.dtype) -> torch.Tensor:
        """The tensors ``names`` (one shape) stacked on a new first dim, in ``dtype``: each read with one pread
        straight into its slot (no mmap: a page fault per 4 KB of a large stack costs more than the read)."""
        first = self.meta(names[0])
        if self.fp8_block and first[0] not in (torch.float32, torch.float16, torch.bfloat16):
            return torch.stack([self.get(n) for n in names]).to(dtype)  # dequantized one by one
        out = torch.empty((len(names), *first[1]), dtype=first[0])
        fds: dict[Path, int] = {}  # one descriptor per file the stack reads from
        try:
            for k, name in enumerate(names):
                f, stored = self.where[name], self.stored.get(name, name)
                header, base = self._header(f)
                start, end = header[stored]["data_offsets"]
                if self.meta(name) != first or end - start != out[k].numel() * out.element_size():
                    return torch.stack([self.get(n) for n in names]).to(dtype)  # mixed tensors: the plain way
                if f not in fds:
                    fds[f] = os.open(f, os.O_RDONLY)
                if not read_exact(fds[f], byte_view(out[k]), base + start):
                    raise UserError(f"{f}: truncated: tensor {stored} ends past the file")
        finally:
            for fd in fds.values():
                os.close(fd)
        return out.to(dtype)

    def add_aliases(self, alias) -> "LazyTensors":
        """Also read each tensor under ``alias(name)`` where no tensor has that name (a family's other layout)."""
        for name in list(self.where):
            other = alias(name)
            if other != name and other not in self.where:
                self.where[other], self.stored[other] = self.where[name], self.stored.get(name, name)
        return self

    def meta(self, name: str) -> tuple[torch.dtype, tuple]:
        sl = self.handles[self.where[name]].get_slice(self.stored.get(name, name))
        inv = {v: k for k, v in DTYPES.items()}
        return inv[sl.get_dtype()], tuple(sl.get_shape())

    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.handles)


def assign_shards(names: list[str], sizes: list[int], limit: int) -> list[list[str]]:
    """Names in order, cut into shards of at most `limit` bytes (a tensor bigger than that gets one alone)."""
    shards: list[list[str]] = []
    cur: list[str] = []
    size = 0
    for name, b in zip(names, sizes):
        if cur and size + b > limit:
            shards.append(cur)
            cur, size = [], 0
        cur.append(name)
        size += b
    if cur:
        shards.append(cur)
    return shards
