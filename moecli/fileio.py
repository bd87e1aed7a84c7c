"""Files: atomic writes (nothing a user already has is half-overwritten), JSON objects read with one-line errors,
and the raw bytes of tensors (for token files, safetensors streaming and the hidden-state store).

Files are written to a temporary name beside the target and renamed over it;
directories are filled under a temporary name and swapped in by rename. A temporary is
named .NAME.PID.<random>.tmp: the next writer of NAME removes those of dead processes.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from moecli.errors import UserError


def check_output(path: Path, directory: bool) -> None:
    """Refuse, as bad input naming the path, an output that cannot go where it is asked to: a file where a
    directory must go or the reverse, a parent that is a file, (for a file) a parent that does not exist, or a
    place this process cannot write in (a read-only file system, no permission: tried with a file that has
    no name there). Directories are created with their parents."""
    path = Path(path)
    if path.exists():  # "." and "/" among them, which have no parents to look at
        if path.is_dir() != directory:
            raise UserError(f"{path}: exists and is not a directory" if directory else
                            f"{path}: is a directory; give a file name")
        where = path if directory else path.parent
    else:
        where = next(p for p in path.parents if p.exists())  # the nearest ancestor there is must be a directory
        if not where.is_dir():
            raise UserError(f"{path}: {where} is a file, not a directory")
        if not directory and where != path.parent:
            raise UserError(f"{path}: no such directory {path.parent}")
    try:
        with tempfile.TemporaryFile(dir=where):  # O_TMPFILE on Linux: nothing appears in the directory
            pass
    except OSError as e:
        raise UserError(f"{path}: cannot write in {where}: {e.strerror}") from None


def temporary_prefix(name: str) -> str:
    """A writer's temporary beside NAME: .NAME.PID.<random>.tmp, so that a later writer can tell whose it is."""
    return f".{name}.{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: alive
        return True
    return True


def remove_stale_temporaries(parent: Path, name: str) -> list[Path]:
    """Remove the temporaries beside NAME (.NAME.PID.<random>.tmp) whose writer is no longer running (killed
    mid-write); returns what it removed. Those of a live process, and any other name, are left alone."""
    removed = []
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return removed
    for entry in entries:
        rest = entry.name[len(name) + 2:] if entry.name.startswith(f".{name}.") else ""
        pid = rest.split(".", 1)[0]
        if not (rest.endswith(".tmp") and pid.isdigit()) or _alive(int(pid)):
            continue
        with contextlib.suppress(OSError):
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            removed.append(entry)
    return removed


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    check_output(path, directory=False)
    remove_stale_temporaries(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temporary_prefix(path.name), suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json_object(path: Path, what: str = "JSON") -> dict:
    """A JSON file that must hold an object; anything else (missing, unreadable, not JSON, a list) is bad input
    naming the file."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read {what}: {e}") from None
    except RecursionError:
        raise UserError(f"{path}: cannot read {what}: nested too deeply") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def save_safetensors(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """safetensors' save_file, from CPU copies of tensors on another device (--device), with the file given
    the usual permissions (save_file leaves it 0600, so a checkpoint or export shared with a group could not
    be read by it)."""
    from safetensors.torch import save_file

    save_file({k: v.cpu() for k, v in tensors.items()}, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())


def metrics_upto(path: Path, step: int) -> list[tuple[str, dict]]:
    """(line, record) for each line of a metrics.jsonl whose step is at most `step`, in order; a line cut
    short by a kill is skipped. Lines past a checkpoint's step belong to steps the checkpoint does not hold."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f.read().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and rec.get("step", 0) <= step:
                rows.append((line, rec))
    return rows


@contextlib.contextmanager
def atomic_dir(target: Path, overwrite: bool = False):
    """Yield a temporary directory; on success it replaces ``target`` in one rename.

    Without ``overwrite``, an existing non-empty ``target`` is refused (UserError)
    before anything is written. An existing empty ``target`` (which may be the shell's
    working directory, "-o .", or a mount point) is kept, and filled by moving the
    finished entries into it, each in one rename; a non-empty one that is or holds the
    working directory is refused even with ``overwrite``.
    """
    target = Path(target)
    check_output(target, directory=True)
    full = target.resolve()  # "." and ".." have no name of their own to make a temporary name from
    filled = target.exists() and any(e.name != LOCK_NAME for e in target.iterdir())  # output_lock's own file
    if filled and not overwrite:
        raise UserError(f"{target}: output directory exists and is not empty (choose another -o, or pass --force)")
    if filled and Path.cwd().resolve().is_relative_to(full):
        raise UserError(f"{target}: is the working directory, or holds it; replacing it (--force) would leave "
                        "the shell in a deleted directory: choose another -o")
    in_place = target.exists() and not filled
    tmp_parent = full if in_place else full.parent
    tmp_parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(tmp_parent, full.name)  # a writer killed mid-write left its temporary behind
    tmp = Path(tempfile.mkdtemp(dir=tmp_parent, prefix=temporary_prefix(full.name), suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if in_place:
            for entry in sorted(tmp.iterdir()):
                os.rename(entry, full / entry.name)
            tmp.rmdir()
        else:
            replace_dir(tmp, full)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_files(src: Path, dst: Path, names) -> None:
    """Copy each of ``names`` that ``src`` holds as a file into ``dst`` (tokenizer files beside converted weights)."""
    for name in names:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(dst) / name)


def replace_dir(tmp: Path, target: Path) -> None:
    """Swap ``tmp`` in as ``target``; the old ``target`` survives under .old until the swap is done."""
    old = target.parent / f".{target.name}.old"
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- raw bytes of tensors


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of a contiguous CPU tensor (one memcpy; no numpy needed)."""
    t = t.detach().cpu().contiguous()
    return ctypes.string_at(t.data_ptr(), t.numel() * t.element_size()) if t.numel() else b""


def byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor as a writable memoryview of its own memory (no copy)."""
    n = t.numel() * t.element_size()
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B") if n else memoryview(b"")


def read_exact(fd: int, view: memoryview, offset: int) -> bool:
    """Fill ``view`` from file descriptor ``fd`` at ``offset`` (pread: no seek, no mmap); False if the file ends
    first."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if not got:
            return False
        done += got
    return True


LOCK_NAME = ".moe.lock"  # the lock of an output that holds the working directory (-o .)


def lock_path(target: Path) -> Path:
    """Where the lock of an output lives: beside it (.NAME.lock), or inside it when it is or holds the working
    directory (whose parent is not the user's to write in)."""
    full = Path(target).resolve()
    if Path.cwd().resolve().is_relative_to(full):
        return full / LOCK_NAME
    return full.parent / f".{full.name}.lock"


@contextlib.contextmanager
def output_lock(target: Path):
    """Hold the advisory lock (flock) of an output for the writer's life: a second writer is refused in one line
    naming the holder's pid; the kernel lets go of a dead process's lock, so the next writer takes it over. The lock
    file is removed when the writer is done."""
    import fcntl

    check_output(Path(target), directory=True)  # a file in the way, a place this process cannot write in
    path = lock_path(target)
    for _ in range(10):  # the file may be removed by the holder between our open and our lock: open it again
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"{target}: cannot write there ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UserError(f"{target}: another moe process (pid {holder}) is writing there; wait for it to end, "
                            "or choose another -o") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    else:
        raise UserError(f"{path}: could not take the output's lock (it keeps being replaced)")
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)
