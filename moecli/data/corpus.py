"""Where text comes from: DATA arguments (files, globs, directories, pipes, stdin) expanded into sources, each
read in chunks or as a .jsonl file's documents, and the embedded default corpus (the Python standard library's own
source, on every machine that runs moecli). A file ending in .gz, .bz2 or .xz (the standard library's codecs) or
.zst (the zstandard package, an optional extra) is read decompressed, as it streams: x.jsonl.gz is JSON Lines."""

from __future__ import annotations

import bz2
import codecs
import glob
import gzip
import io
import json
import lzma
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


COMPRESSED = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz", ".zst": "zstandard"}


def compression(src) -> str | None:
    """The codec a source's name says it is compressed with (None: plain)."""
    return None if src == "-" else COMPRESSED.get(Path(src).suffix.lower())


def open_binary(src: str | Path):
    """A file opened for reading its (decompressed) bytes."""
    codec = compression(src)
    if codec == "gzip":
        return gzip.open(src, "rb")
    if codec == "bzip2":
        return bz2.open(src, "rb")
    if codec == "xz":
        return lzma.open(src, "rb")
    if codec == "zstandard":
        try:
            import zstandard
        except ImportError:
            raise UserError(f"{src}: a .zst file needs the zstandard package: pip install zstandard") from None
        return zstandard.ZstdDecompressor().stream_reader(open(src, "rb"), closefd=True)
    return open(src, "rb")


def _bad_stream(src, e: Exception) -> UserError:
    if isinstance(e, OSError) and e.strerror:
        return UserError(f"{src}: cannot read: {e.strerror}")
    return UserError(f"{src}: not a readable {compression(src) or 'text'} file ({e or type(e).__name__})")


def read_chunks(src: str | Path):
    if src == "-":
        stream = sys.stdin.buffer
        while chunk := stream.read(CHUNK):
            yield chunk
        return
    try:
        with open_binary(src) as f:
            while chunk := f.read(CHUNK):
                yield chunk
    except UserError:
        raise
    except (OSError, EOFError, lzma.LZMAError, ValueError) as e:
        raise _bad_stream(src, e) from None


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
    """A .jsonl file, compressed or not (x.jsonl.gz)."""
    if src == "-":
        return False
    p = Path(src)
    return (p.with_suffix("") if compression(p) else p).suffix.lower() == ".jsonl"


def jsonl_texts(src, field: str = JSONL_FIELD):
    """Each document of a .jsonl file (``jsonl_docs``), a newline between documents."""
    for i, text in enumerate(jsonl_docs(src, field)):
        yield text if i == 0 else "\n" + text


def jsonl_docs(src, field: str = JSONL_FIELD):
    """The `field` string of each line of a .jsonl file; blank lines are skipped, and a line that is not a
    JSON object with that string is bad input naming the file and line."""
    try:
        with io.TextIOWrapper(open_binary(src), encoding="utf-8", errors="replace") as f:
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
    except UserError:
        raise
    except (OSError, EOFError, lzma.LZMAError, ValueError) as e:
        raise _bad_stream(src, e) from None
