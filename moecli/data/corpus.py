"""Where text comes from: DATA arguments (files, globs, directories, pipes, stdin) expanded into sources, each
read in chunks or as a .jsonl file's documents, and the embedded default corpus (the Python standard library's own
source, on every machine that runs moecli)."""

from __future__ import annotations

import codecs
import glob
import json
import sys
import sysconfig
from pathlib import Path

from moecli.errors import UserError

CHUNK = 1 << 20  # bytes read at a time
DEFAULT_CORPUS_BYTES = 4 << 20  # embedded default: first ~4 MB of the Python standard library's source
# JSON Lines inputs (one JSON object per line, as Hugging Face datasets and most corpora ship): the
# text of each line's field (JSONL_FIELD unless --jsonl-field names another) is a document, documents
# joined by newlines as files are.
JSONL_FIELD = "text"


def default_corpus_files(limit_bytes: int = DEFAULT_CORPUS_BYTES) -> list[Path]:
    """The Python standard library's own .py files: present on every machine that runs moecli."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for p in sorted(stdlib.glob("*.py")) + sorted(stdlib.glob("*/*.py")):
        if "site-packages" in p.parts or "test" in p.parts:
            continue
        files.append(p)
        total += p.stat().st_size
        if total >= limit_bytes:
            break
    if not files:
        raise UserError(f"{stdlib}: no Python source files found for the default corpus; pass DATA files")
    return files


def expand_data_args(args: list[str]) -> list[str | Path]:
    """Files, globs and directories (recursively, text-like files) -> an ordered list; '-' is stdin. A path
    that is neither a file nor a directory but exists (a pipe: the shell's <(command), a named FIFO) is
    read as it is, once."""
    out: list[str | Path] = []
    for a in args:
        if a == "-":
            out.append("-")
            continue
        p = Path(a)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
            if not found:
                raise UserError(f"{a}: directory holds no files")
            out.extend(found)
        elif p.exists():  # a file, or a pipe
            out.append(p)
        elif any(ch in a for ch in "*?["):
            found = sorted(Path(f) for f in glob.glob(a, recursive=True) if Path(f).is_file())
            if not found:
                raise UserError(f"{a}: glob matches no files")
            out.extend(found)
        else:
            raise UserError(f"{a}: no such file or directory")
    return out


def read_chunks(src: str | Path):
    if src == "-":
        stream = sys.stdin.buffer
        while chunk := stream.read(CHUNK):
            yield chunk
        return
    try:
        with open(src, "rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk
    except OSError as e:
        raise UserError(f"{src}: cannot read: {e.strerror}") from None


def text_pieces(src, jsonl_field: str = JSONL_FIELD):
    """The text of a source in pieces: a .jsonl file's documents (``jsonl_texts``); anything else decoded
    from UTF-8 chunk by chunk without splitting a character (for tokenizers that need text)."""
    if is_jsonl(src):
        yield from jsonl_texts(src, jsonl_field)
        return
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for chunk in read_chunks(src):
        yield decoder.decode(chunk)
    yield decoder.decode(b"", final=True)


def is_jsonl(src) -> bool:
    return src != "-" and Path(src).suffix.lower() == ".jsonl"


def jsonl_texts(src, field: str = JSONL_FIELD):
    """Each document of a .jsonl file (``jsonl_docs``), a newline between documents."""
    for i, text in enumerate(jsonl_docs(src, field)):
        yield text if i == 0 else "\n" + text


def jsonl_docs(src, field: str = JSONL_FIELD):
    """The `field` string of each line of a .jsonl file; blank lines are skipped, and a line that is not a
    JSON object with that string is bad input naming the file and line."""
    try:
        with open(src, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{src}:{n}: not JSON ({e.msg}); a .jsonl file holds one JSON object per line")
                except RecursionError:
                    raise UserError(f"{src}:{n}: JSON nested too deeply") from None
                if not isinstance(doc, dict):
                    kind = {list: "an array", str: "a string", bool: "true/false", type(None): "null"}.get(
                        type(doc), "a number")
                    raise UserError(f"{src}:{n}: {kind}, not a JSON object; a .jsonl file holds one JSON object "
                                    "per line")
                text = doc.get(field)
                if not isinstance(text, str):
                    keys = f" (its keys: {', '.join(map(str, list(doc)[:8]))}; --jsonl-field names the text's)" \
                        if doc else ""
                    raise UserError(f"{src}:{n}: no \"{field}\" string field in this line's JSON object{keys}")
                yield text
    except OSError as e:
        raise UserError(f"{src}: cannot read: {e.strerror}") from None
