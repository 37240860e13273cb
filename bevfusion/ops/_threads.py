"""The ops' one CPU thread pool: chunks of a loop on a few Python threads, for kernels that release the GIL.

Used by the sparse-conv im2col dataflow (torch ops on blocks of rows) and by the bev_pool CPU kernels
(numba, `nogil`). `run_chunks(fn, bounds)` runs `fn(lo, hi)` over consecutive chunks on up to
`torch.get_num_threads()` threads (the calling thread included), read at call time, so
`torch.set_num_threads` and pytest-xdist's one thread per worker are followed. With one thread, or from
inside a pool task, the chunks run inline and in order.

Nothing here changes torch's global state (no `torch.set_num_threads`): a torch op inside a chunk uses
torch's intra-op thread count as any op does. Chunks run under `torch.no_grad()`, as grad mode is
thread-local and the kernels never record autograd. Callers give each chunk its own output rows (or
their own partial results, combined in chunk order), so a result never depends on which thread ran a
chunk. The pool is created on first use and replaced by a larger one when more threads are wanted.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

import torch

__all__ = ["num_threads", "even_bounds", "run_chunks"]

T = TypeVar("T")

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_lock = threading.Lock()
_local = threading.local()


def num_threads() -> int:
    """Threads a call may use now: torch's intra-op thread count (at least 1)."""
    return max(1, torch.get_num_threads())


def even_bounds(n: int, parts: int) -> list[int]:
    """Boundaries of at most `parts` near-equal consecutive chunks of range(n) ([0] when n == 0)."""
    parts = max(1, min(parts, n))
    return sorted({n * t // parts for t in range(parts + 1)})


def _submit(fn: Callable[[], None], copies: int) -> list:
    """Submit `copies` calls of fn to the pool (grown to at least `copies` workers first); under the lock,
    so that no caller submits to a pool that another has just replaced."""
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size < copies:
            old = _pool
            _pool = ThreadPoolExecutor(copies, thread_name_prefix="bevfusion-ops", initializer=_mark_worker)
            _pool_size = copies
            if old is not None:
                old.shutdown(wait=False)  # tasks already queued there still run
        return [_pool.submit(fn) for _ in range(copies)]


def _mark_worker() -> None:
    _local.in_pool = True


def run_chunks(fn: Callable[[int, int], T], bounds: Sequence[int], threads: int | None = None) -> list[T]:
    """fn(bounds[i], bounds[i + 1]) for every non-empty chunk, on up to `threads` threads (default
    `num_threads()`), each thread taking the next chunk when it is free; returns the results in chunk
    order. If a chunk raises, the first exception is re-raised once every thread has stopped."""
    ranges = [(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]
    threads = min(num_threads() if threads is None else max(1, int(threads)), len(ranges))
    if threads <= 1 or getattr(_local, "in_pool", False):
        with torch.no_grad():
            return [fn(lo, hi) for lo, hi in ranges]
    results: list = [None] * len(ranges)
    errors: list[BaseException] = []
    next_lock = threading.Lock()
    cursor = [0]

    def drain() -> None:
        with torch.no_grad():
            while not errors:
                with next_lock:
                    i = cursor[0]
                    cursor[0] += 1
                if i >= len(ranges):
                    return
                try:
                    results[i] = fn(*ranges[i])
                except BaseException as e:  # noqa: BLE001 - re-raised below, in the caller's thread
                    errors.append(e)

    futures = _submit(drain, threads - 1)
    drain()  # the calling thread works too
    for f in futures:
        f.result()
    if errors:
        raise errors[0]
    return results
