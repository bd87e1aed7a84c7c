"""A small pool of persistent worker threads that each run torch ops on ONE intra-op thread.

Why: on a few CPU cores, bf16 matrix products of expert size (about 1024 x 1024 x 512)
often do not use the second core at all (oneDNN's work split), while two products
running side by side, one per core, do. ``run(jobs)`` runs one job per worker and
waits for all; a job's exception is re-raised in the caller.

Before handing jobs over, ``run`` asks the caller's OpenMP runtime to release its idle threads
(``omp_pause_resource_all``, OpenMP 5.0): after the caller's last parallel op they keep spin-waiting
for the next one for a few ms (libgomp's default spin count) and take the cores the workers were
woken to run on. Measured in the 8-expert bf16 layer, fwd+bwd: workers started 1.4 ms late on
average, 0.2-0.4 ms with the release, and the layer ran 1.05-1.07x faster (paired, 3 processes);
the caller's next parallel op restarts its threads (~60 us).

Workers run with autograd off (jobs write results into tensors given to them) and
without the caller's autocast state: callers cast first. The pool is made on first
use with as many workers as the caller's torch.get_num_threads(), and dropped in a
forked child (its threads do not exist there).
"""

from __future__ import annotations

import ctypes
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
        if RELEASE_OPENMP and _omp_pause is not None:
            _omp_pause(_OMP_PAUSE_SOFT)  # the caller's idle OpenMP threads stop spinning (module docstring)
        dones = []
        for q, job in zip(self._queues, jobs):
            done = queue.SimpleQueue()
            q.put((job, done))
            dones.append(done)
        errors = [done.get() for done in dones]
        for e in errors:
            if e is not None:
                raise e


def _find_omp_pause() -> Callable[[int], int] | None:
    """The process's global omp_pause_resource_all (torch's OpenMP runtime: libgomp in the Linux wheels,
    whose symbols are global there; tested), or None where no such symbol is found."""
    try:
        return ctypes.CDLL(None).omp_pause_resource_all
    except (AttributeError, OSError, TypeError):  # TypeError: no CDLL(None) (Windows)
        return None


RELEASE_OPENMP = True  # False: run() leaves the caller's OpenMP threads alone (to measure the difference)
_OMP_PAUSE_SOFT = 1  # omp_pause_soft: threads end, the runtime stays initialised
_omp_pause = _find_omp_pause()
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
