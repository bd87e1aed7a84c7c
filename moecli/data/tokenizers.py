"""Tokenizers: UTF-8 bytes (the default, nothing to download) or a Hugging Face tokenizer.json (the optional
``tokenizers`` package), and the one a checkpoint names."""

from __future__ import annotations

from pathlib import Path
from typing import Union

from moecli.errors import UserError


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255: needs no download and handles any text."""

    kind = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def to_config(self) -> dict:
        return {"type": "byte"}


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` through the optional ``tokenizers`` package."""

    kind = "hf"

    def __init__(self, path: Path):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise UserError(f"{path}: reading tokenizer.json needs the optional 'tokenizers' package "
                            "(pip install 'moecli[hf]')") from None
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise UserError(f"{path}: not a readable tokenizer.json: {str(e).splitlines()[0]}") from None
        self.path = Path(path)
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def to_config(self) -> dict:
        return {"type": "hf", "file": "tokenizer.json"}


def load_tokenizer(path: str | Path | None) -> "Tokenizer":
    return ByteTokenizer() if path is None else HFTokenizer(Path(path))


def tokenizer_from_checkpoint(directory: Path, cfg: dict) -> "Tokenizer":
    tcfg = cfg.get("tokenizer") or {"type": "byte"}
    if tcfg.get("type") == "hf":
        return HFTokenizer(directory / tcfg.get("file", "tokenizer.json"))
    if (directory / "tokenizer.json").is_file() and "format" not in cfg:  # a Hugging Face model directory
        return HFTokenizer(directory / "tokenizer.json")
    return ByteTokenizer()


def check_vocab(tok, model, where) -> None:
    if tok.vocab_size > model.recipe.model.vocab_size:
        hint = " (no tokenizer.json beside the model, so bytes were assumed)" if tok.kind == "byte" else ""
        raise UserError(f"{where}: the tokenizer has {tok.vocab_size} tokens but the model only "
                        f"{model.recipe.model.vocab_size}{hint}")


Tokenizer = Union[ByteTokenizer, HFTokenizer]  # what the commands and training take
