"""Token files: text tokenised once into memory-mapped token ids, the validation split, batches and windows.

Text files are tokenised once, streaming, into a flat binary file of token ids
(uint8 for bytes, uint16/int32 for larger vocabularies) that is then memory-
mapped, so a multi-GB corpus trains in bounded memory. The tail
``val_fraction`` of the token stream is the validation split; with --data-weights
each DATA argument is a source of its own, with its own tail (``TokenData``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moecli.data.corpus import (JSONL_FIELD, default_corpus_files, expand_data_args, is_jsonl, jsonl_texts, read_chunks,
                                text_pieces)
from moecli.data.tokenizers import ByteTokenizer, HFTokenizer
from moecli.errors import UserError
from moecli.fileio import atomic_write_json, tensor_bytes

# ---------------------------------------------------------------- corpus discovery


def _fingerprint(sources: list[str | Path], tokenizer, jsonl_field: str = JSONL_FIELD,
                 part_ends: list[int] | None = None) -> str:
    """The cache key of these sources' tokens; ``part_ends`` (--data-weights) also keys where each part ends."""
    h = hashlib.sha256(json.dumps(tokenizer.to_config()).encode())
    if isinstance(tokenizer, HFTokenizer):
        h.update(tokenizer.path.read_bytes())
    if part_ends is not None:
        h.update(f"parts:{part_ends}".encode())
    for s in sources:
        st = None if s == "-" else Path(s).stat()
        if st is None or not stat.S_ISREG(st.st_mode):
            h.update(b"<stream>")  # stdin or a pipe: read once, never reused from cache
            h.update(os.urandom(8))
        else:
            h.update(f"{Path(s).resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
            if is_jsonl(s):  # read as JSON Lines (earlier moecli versions took the raw bytes: not the same tokens)
                h.update(f"|jsonl:{jsonl_field}".encode())
    return h.hexdigest()[:16]


def _dtype_for(vocab_size: int) -> torch.dtype:
    return torch.uint8 if vocab_size <= 256 else torch.int16 if vocab_size <= 32768 else torch.int32


def encode_to_file(sources: list[str | Path], tokenizer, path: Path, spans: list | None = None,
                   jsonl_field: str = JSONL_FIELD) -> int:
    """Stream every source through the tokenizer into ``path``; returns the number of tokens. With
    ``spans``, appends each source's (start, end) token offsets to it (the separators lie between)."""
    dtype = _dtype_for(tokenizer.vocab_size)
    n = 0
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        for i, src in enumerate(sources):
            if i:  # documents are separated by a newline
                sep = tokenizer.encode("\n")
                f.write(_to_bytes(sep, dtype))
                n += len(sep)
            start = n
            if isinstance(tokenizer, ByteTokenizer):  # the bytes are the tokens: a plain file's as stored
                texts = jsonl_texts(src, jsonl_field) if is_jsonl(src) else None
                for chunk in (t.encode("utf-8") for t in texts) if texts is not None else read_chunks(src):
                    f.write(chunk)
                    n += len(chunk)
            else:
                for text in text_pieces(src, jsonl_field):
                    ids = tokenizer.encode(text)
                    f.write(_to_bytes(ids, dtype))
                    n += len(ids)
            if spans is not None:
                spans.append((start, n))
    os.replace(tmp, path)
    return n


def _to_bytes(ids: list[int], dtype: torch.dtype) -> bytes:
    return tensor_bytes(torch.tensor(ids, dtype=torch.int64).to(dtype))


def open_tokens(path: Path, n: int, vocab_size: int) -> torch.Tensor:
    """Memory-map a token file (read-only view, pages loaded on demand)."""
    if n == 0:
        return torch.zeros(0, dtype=_dtype_for(vocab_size))
    return torch.from_file(str(path), shared=False, size=n, dtype=_dtype_for(vocab_size))


@dataclass
class TokenData:
    """A run's tokens. ``train`` holds one memory-mapped stream, or with --data-weights one per DATA argument
    (``sources`` names them). ``val`` holds each of those streams' held-out tail, or one stream: --val-data's."""

    train: list[torch.Tensor]
    val: list[torch.Tensor]
    fingerprint: str  # the token cache's, or "TRAIN+VAL" with --val-data
    sources: list[str] = field(default_factory=list)  # with --data-weights: the DATA argument of each part
    weights: list[float] = field(default_factory=lambda: [1.0])  # sampling probability of each train stream

    @property
    def val_from_own_text(self) -> bool:
        """Whether validation is --val-data's text (its own cache) rather than the tail of DATA."""
        return "+" in self.fingerprint

    @property
    def n_train(self) -> int:
        return sum(t.numel() for t in self.train)

    @property
    def n_val(self) -> int:
        return sum(t.numel() for t in self.val)


def prepare_tokens(data_args: list[str], tokenizer, cache_dir: Path, val_fraction: float, seq_len: int,
                   cached_fingerprint: str | None = None, val_args: list[str] | None = None,
                   jsonl_field: str = JSONL_FIELD, parts: bool = False) -> TokenData:
    """Tokenise DATA (or the default corpus) into ``cache_dir``, reusing the cache when unchanged.

    The validation split is the tail ``val_fraction`` of the tokens, or with ``val_args`` (--val-data)
    those texts, tokenised into a cache of their own (then all of DATA is training data; the run's
    fingerprint is the two caches' joined by "+"). With ``cached_fingerprint`` and neither DATA nor
    val_args (a resumed run, or a rank started by the launcher), the caches are used as they are,
    provided they still hold exactly those tokens. ``jsonl_field``: the text field of .jsonl sources.
    With ``parts`` (--data-weights), each DATA argument is a part of its own: its own training stream
    and, without val_args, its own held-out tail (the cache records the parts, so a reused cache has them).
    """
    if "-" in (data_args or []) and "-" in (val_args or []):
        raise UserError("--val-data -: standard input is already DATA (it can be read once); give a file")
    reuse = cached_fingerprint is not None and not data_args and not val_args
    fps = cached_fingerprint.split("+") if reuse else [None, None]
    train_all, train_fp, spans = _cached_tokens(cache_dir, "tokens", None if reuse else data_args, tokenizer,
                                                fps[0], "DATA", jsonl_field, parts)
    if spans:
        streams = [(name, train_all[a:b]) for name, a, b in spans]
    else:
        streams = [(", ".join(map(str, data_args)) or "default corpus", train_all)]
    names = [name for name, _ in streams] if spans else []
    if val_args or (reuse and len(fps) == 2):
        val, val_fp, _ = _cached_tokens(cache_dir, "val", None if reuse else val_args, tokenizer, fps[-1],
                                        "--val-data", jsonl_field)
        for what, toks in (*streams, ("--val-data " + " ".join(map(str, val_args or [])), val)):
            if toks.numel() < seq_len + 1:
                raise UserError(f"{what.strip()}: only {toks.numel()} tokens; need at least {seq_len + 1} "
                                f"for one window at seq_len {seq_len}")
        return TokenData([toks for _, toks in streams], [val], train_fp + "+" + val_fp, names)
    train, held_out = [], []
    for where, toks in streams:
        n = toks.numel()
        n_val = val_tokens(n, val_fraction, seq_len)
        if n - n_val < seq_len + 1:
            raise UserError(f"{where}: only {n} tokens; need at least {2 * (seq_len + 1)} for training and "
                            f"validation at seq_len {seq_len}")
        train.append(toks[: n - n_val])
        held_out.append(toks[n - n_val:])
    return TokenData(train, held_out, train_fp, names)


def _cached_tokens(cache_dir: Path, name: str, args: list[str] | None, tokenizer, cached_fp: str | None,
                   what: str, jsonl_field: str = JSONL_FIELD, parts: bool = False):
    """(tokens, fingerprint, parts) of cache_dir/NAME.bin: with args None the cache must hold cached_fp's
    tokens; else args (or the default corpus, for no DATA) are fingerprinted and tokenised unless already
    cached. With ``parts``, each argument's tokens are a part of their own: parts lists [argument, start,
    end] per argument (a cache made so gives them back when reused); else it is empty."""
    meta_path, bin_path = cache_dir / f"{name}.json", cache_dir / f"{name}.bin"
    meta = _read_meta(meta_path, bin_path)
    if args is None:
        if not meta or meta.get("fingerprint") != cached_fp:
            raise UserError(f"{cache_dir}: token cache ({what}) missing, or changed since the checkpoint; give "
                            f"the run's {what} again")
    else:
        groups = [expand_data_args([a]) for a in args] if args else [default_corpus_files()]
        sources = [s for g in groups for s in g]
        ends = list(itertools.accumulate(len(g) for g in groups)) if parts else None  # each part's last source + 1
        cache_dir.mkdir(parents=True, exist_ok=True)
        fp = _fingerprint(sources, tokenizer, jsonl_field, ends)
        if not meta or meta.get("fingerprint") != fp:
            spans: list = []
            n = encode_to_file(sources, tokenizer, bin_path, spans, jsonl_field=jsonl_field)
            meta = {"fingerprint": fp, "tokens": n, "bytes": bin_path.stat().st_size, "sources": len(sources)}
            if parts:  # a part runs from its first source's start to its last source's end
                meta["parts"] = [[str(a), spans[i][0], spans[j - 1][1]]
                                 for a, i, j in zip(args, [0, *ends[:-1]], ends)]
            atomic_write_json(meta_path, meta)
    return open_tokens(bin_path, meta["tokens"], tokenizer.vocab_size), meta["fingerprint"], meta.get("parts", [])


def val_tokens(n: int, val_fraction: float, seq_len: int) -> int:
    """How many of n tokens (the tail) the validation split holds: val_fraction of them, at least one window."""
    return max(int(n * val_fraction), seq_len + 1)


# A pretrained (Hugging Face) model is scored on windows of its own context, up to this many tokens: short
# windows understate what it knows (a 135M-parameter Llama: loss 1.91 on 128-token windows, 1.20 on 1024).
PRETRAINED_WINDOW = 2048
# without --batch-size, a batch holds about this many tokens (16 windows of 128, 1 of 2048): the logits of a
# 2048-token window over a 49k vocabulary alone take 400 MB in float32
BATCH_TOKENS = 2048


def default_window(recipe, available: int, pretrained: bool = False) -> tuple[int, str]:
    """(window length, where it comes from) when none is given: for a pretrained model its context up to
    PRETRAINED_WINDOW, else the recipe's training seq_len (within the context); or the `available` tokens of a
    text shorter than that."""
    ctx = recipe.model.context
    if pretrained:
        window = min(ctx, PRETRAINED_WINDOW)
        why = f"the model's context ({ctx})" + (f" capped at {PRETRAINED_WINDOW}" if ctx > window else "")
    else:
        window, why = min(ctx, recipe.train.seq_len), "the recipe's train.seq_len"
    if available < window:
        return max(1, available), "the text's length"
    return window, why


def default_batch(window: int, most: int) -> int:
    """Windows per batch when --batch-size is not given: about BATCH_TOKENS tokens, at most ``most``."""
    return max(1, min(most, BATCH_TOKENS // window))


def run_val_split(checkpoint_dir: Path, recipe, tokenizer) -> tuple[list[torch.Tensor], list[str], str]:
    """The validation split a training run held out, for a checkpoint inside that run's output directory
    (RUN/checkpoint or RUN/best, the token cache in RUN/data): ([tokens], [], "validation split of RUN"), or
    for a run that mixed sources (--data-weights) each source's tail and the sources' names. The cache
    must still hold the tokens the checkpoint was trained on (the fingerprint in train_state.json, or in a
    best model's config.json)."""
    trained_on = None
    for name in ("train_state.json", "config.json"):
        try:
            trained_on = trained_on or json.loads((checkpoint_dir / name).read_text()).get("data")
        except (OSError, json.JSONDecodeError, AttributeError):
            pass
    if checkpoint_dir.name not in ("checkpoint", "best") or not isinstance(trained_on, str):
        raise UserError(f"{checkpoint_dir}: DATA: give a file, directory, glob or - for stdin (with no DATA, "
                        f"the checkpoint must be a `moe train` run's, with its token cache in RUN/data)")
    cache, t = checkpoint_dir.parent / "data", recipe.train
    data = prepare_tokens([], tokenizer, cache, t.val_fraction, t.seq_len, trained_on)
    sources = data.sources if len(data.val) > 1 else []  # with --val-data, one text
    return data.val, sources, f"validation split of {checkpoint_dir.parent}"


def _read_meta(meta_path: Path, bin_path: Path) -> dict | None:
    if not (meta_path.is_file() and bin_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        return None
    return meta if bin_path.stat().st_size == meta.get("bytes") else None


def sample_batch(tokens: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator):
    """Random windows: inputs x_BS and next-token targets y_BS."""
    starts = torch.randint(0, tokens.numel() - seq_len, (batch_size,), generator=generator)  # x and y fit
    xy = torch.stack([tokens[s: s + seq_len + 1].long() for s in starts.tolist()])
    return xy[:, :-1], xy[:, 1:]


def sample_mixed(streams: list[torch.Tensor], weights: list[float], batch_size: int, seq_len: int,
                 generator: torch.Generator):
    """sample_batch over several token streams (--data-weights): each row's stream is drawn with probability
    proportional to its weight, then a window of it at random. One stream: sample_batch's windows."""
    if len(streams) == 1:
        return sample_batch(streams[0], batch_size, seq_len, generator)
    which = torch.multinomial(torch.tensor(weights, dtype=torch.float64), batch_size, replacement=True,
                              generator=generator)
    rows = []
    for i in which.tolist():
        s = int(torch.randint(0, streams[i].numel() - seq_len, (1,), generator=generator))
        rows.append(streams[i][s: s + seq_len + 1].long())
    xy = torch.stack(rows)
    return xy[:, :-1], xy[:, 1:]


def read_tokens(args: list[str], tok, max_tokens: int, jsonl_field: str = JSONL_FIELD) -> torch.Tensor:
    """The first max_tokens tokens of the inputs, read chunk by chunk (a large file is not read whole)."""
    ids: list[int] = []
    for i, src in enumerate(expand_data_args(args)):
        if i:  # sources joined by a newline, as encode_to_file joins them
            ids.extend(tok.encode("\n"))
        for text in text_pieces(src, jsonl_field):
            ids.extend(tok.encode(text))
            if len(ids) >= max_tokens:
                return torch.tensor(ids[:max_tokens], dtype=torch.long)
    return torch.tensor(ids, dtype=torch.long)


def eval_windows(tokens: torch.Tensor, seq_len: int, max_windows: int | None = None) -> list[int]:
    """Start offsets of non-overlapping windows covering ``tokens`` (evenly thinned to max_windows)."""
    n_windows = (tokens.numel() - 1) // seq_len
    starts = [i * seq_len for i in range(n_windows)]
    if max_windows is not None and len(starts) > max_windows:
        step = len(starts) / max_windows
        starts = [starts[int(i * step)] for i in range(max_windows)]
    return starts
