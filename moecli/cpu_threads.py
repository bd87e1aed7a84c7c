"""A small pool of persistent worker threads that each run torch ops on ONE intra-op thread.

Why: on a few CPU cores, bf16 matrix products of expert size (about 1024 x 1024 x 512)
often do not use the second core at all (oneDNN's work split), while two products
running side by side, one per core, do. ``run(jobs)`` runs one job per worker and
waits for all; a job's exception is re-raised in the caller.

Workers run with autograd off (jobs write results into tensors given to them) and
without the caller's autocast state: callers cast first. The pool is made on first
use with as many workers as the caller's torch.get_num_threads(), and dropped in a
forked child (its threads do not exist there).
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Callable

import torch


class WorkerPool:
    def __init__(self, num_workers: int):
        self.num_workers = num_workers
        self._queues = [queue.SimpleQueue() for _ in range(num_workers)]
        started = threading.Barrier(num_workers + 1)
        caller_threads = torch.get_num_threads()
        for q in self._queues:
            threading.Thread(target=self._loop, args=(q, started), daemon=True, name="moecli-expert").start()
        started.wait()
        # set_num_threads(1) in a worker also changes the default that threads made later start
        # with; put it back (the caller's own setting is per-thread and unchanged).
        torch.set_num_threads(caller_threads)

    @staticmethod
    def _loop(q: queue.SimpleQueue, started: threading.Barrier) -> None:
        # torch sets up a thread's OpenMP thread count lazily, from the process default, on the
        # thread's first parallel op; get_num_threads() does that now, so the 1 set next stays.
        # (Otherwise the first elementwise op re-widens the worker to the default, the extra
        # OpenMP threads outnumber the cores, and libgomp then stops spinning between parallel
        # regions in every thread: measured 1.7x slower steps in the caller too.)
        torch.get_num_threads()
        torch.set_num_threads(1)
        started.wait()
        while True:
            job, done = q.get()
            try:
                with torch.no_grad():
                    job()
                error = None
            except BaseException as e:  # handed to the caller, which re-raises it
                error = e
            # drop the job before reporting: it may hold the caller's tensors (a gradient that
            # autograd can only take over without a copy when nothing else refers to it)
            del job
            done.put(error)

    def run(self, jobs: list[Callable[[], None]]) -> None:
        if len(jobs) > self.num_workers:
            raise ValueError(f"{len(jobs)} jobs for {self.num_workers} workers")
        dones = []
        for q, job in zip(self._queues, jobs):
            done = queue.SimpleQueue()
            q.put((job, done))
            dones.append(done)
        errors = [done.get() for done in dones]
        for e in errors:
            if e is not None:
                raise e


_pool: WorkerPool | None = None
_lock = threading.Lock()


def pool() -> WorkerPool:
    """The process's pool, sized to the caller's intra-op threads when first made (or when that changes)."""
    global _pool
    want = torch.get_num_threads()
    with _lock:
        if _pool is None or _pool.num_workers != want:
            _pool = WorkerPool(want)  # an old pool's idle daemon threads just stay blocked
        return _pool


def _forget_pool() -> None:
    global _pool, _lock
    _pool, _lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


def split_by_load(loads: list[int], parts: int) -> list[list[int]]:
    """Indices of `loads` in `parts` groups of near-equal total: largest first onto the lightest
    group (ties to the lower index), so the split depends only on the loads."""
    groups: list[list[int]] = [[] for _ in range(parts)]
    totals = [0] * parts
    for i in sorted(range(len(loads)), key=lambda i: (-loads[i], i)):
        g = min(range(parts), key=lambda g: (totals[g], g))
        groups[g].append(i)
        totals[g] += loads[i]
    return groups
