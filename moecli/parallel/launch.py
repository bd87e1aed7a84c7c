"""Starting the processes of a run and knowing where this one stands.

* ``moe train --nproc N`` spawns N local processes (``spawn``); under ``torchrun`` the environment (RANK,
  WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, ...) is used as is and read here only (``env_int``).
* Ranks training on the CPU talk over gloo, also on a machine with a GPU; ranks on GPUs use nccl for GPU tensors.
* ``current()`` is this process's place: its rank, the world, and the layout the run chose (expert parallelism,
  FSDP).
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moecli.errors import Interrupted, RunFailed, UserError


# Ranks training on the CPU talk over gloo, also where torch sees a GPU (nccl carries only GPU tensors: choosing
# it there made every collective fail). Ranks on GPUs (--device cuda, one each) use nccl for GPU tensors and gloo
# for the CPU ones (the step's logged values, the stop signal).
BACKEND = "gloo"
GPU_BACKEND = "cpu:gloo,cuda:nccl"


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    expert_parallel: bool = False
    fsdp: bool = False  # --fsdp: parameters, gradients and optimizer state sharded (shard_model)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class _Layout:
    """How this process's group shards the model, set once by init_from_env (the process group knows the
    rank and world, not the layout)."""
    expert_parallel: bool = False
    fsdp: bool = False


_LAYOUT = _Layout()


def current() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), _LAYOUT.expert_parallel, _LAYOUT.fsdp)
    return DistInfo()


def init_from_env(expert_parallel: bool = False, fsdp: bool = False, cuda: bool = False) -> DistInfo:
    """Join the process group described by RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (torchrun or our spawner);
    ``cuda``: the ranks train on GPUs."""
    if not dist.is_initialized():
        dist.init_process_group(GPU_BACKEND if cuda else BACKEND)
    _LAYOUT.expert_parallel, _LAYOUT.fsdp = expert_parallel, fsdp
    return current()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn, args, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(max(1, torch.get_num_threads() // world))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C reaches the ranks from the launcher, as SIGTERM
    try:
        result = fn(*args)
        if rank == 0:
            queue.put(("ok", result))
    except BaseException as e:  # report the first failure to the parent as (kind, message)
        queue.put(("error", (type(e).__name__, getattr(e, "message", str(e)), getattr(e, "exit_code", 1))))
        # a stop every rank agreed on (Interrupted) ends each rank in turn; a failure ends the others at once
        raise SystemExit(0 if isinstance(e, Interrupted) else 1) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(nproc: int, fn, *args):
    """Run fn(*args) in nproc local processes; returns rank 0's result, re-raises the first failure.

    A Ctrl-C (SIGINT) or SIGTERM to this process is passed on to the ranks as one SIGTERM (they ignore
    SIGINT, so a Ctrl-C at a terminal, which reaches them too, counts once): they finish the step, save it
    and stop, and this process reports the signal it got (``Interrupted``). A second signal ends them at once.
    """
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    context = mp.start_processes(_worker, args=(nproc, free_port(), fn, args, queue), nprocs=nproc,
                                 start_method="spawn", join=False)
    got: list[int] = []

    def handle(signum, frame):
        got.append(signum)
        for p in context.processes:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM if len(got) == 1 else signal.SIGKILL)

    main = threading.current_thread() is threading.main_thread()  # where Python runs signal handlers
    old = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        while not context.join():
            pass
    except (mp.ProcessExitedException, mp.ProcessRaisedException):
        pass  # the failing worker put its error on the queue
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    status = None
    while not queue.empty():
        item = queue.get()
        if item[0] == "error" or status is None:
            status = item
    if got and (status is None or status[0] == "error" and status[1][0] != "Interrupted"):
        raise KeyboardInterrupt  # a second signal ended the ranks before they could save
    if status is None:
        raise RuntimeError("distributed workers ended without a result")
    if status[0] == "error":
        name, msg, code = status[1]
        if name == "Interrupted":  # by name: what the queue carries across processes
            raise Interrupted(msg, got[0] if got else code - 128)
        raise (UserError if code == 2 else RunFailed)(msg)
    return status[1]


# ---------------------------------------------------------------- the launcher's environment (one reader)


def env_int(name: str, default: int) -> int:
    """An integer that torchrun or ``spawn`` sets in the environment (RANK, WORLD_SIZE, LOCAL_RANK,
    LOCAL_WORLD_SIZE), or ``default`` where it is not set."""
    return int(os.environ.get(name, default))


def launched_world() -> int:
    """The processes torchrun (or ``spawn``) started for this run: WORLD_SIZE, 1 when not launched."""
    return env_int("WORLD_SIZE", 1)


def launched_rank() -> int:
    """This process's global rank (RANK; 0 when not launched)."""
    return env_int("RANK", 0)


def local_rank() -> int:
    """This process's rank on its machine (LOCAL_RANK; 0 when not launched): its GPU's index."""
    return env_int("LOCAL_RANK", 0)


def local_world(procs: int) -> int:
    """The run's processes on this machine: torchrun's LOCAL_WORLD_SIZE, else all ``procs`` of them."""
    return env_int("LOCAL_WORLD_SIZE", procs)
