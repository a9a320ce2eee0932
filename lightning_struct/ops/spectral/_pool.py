"""CPU threading of the spectral ops: independent chunks in parallel, single-threaded torch ops.

The work of the spectral ops is many small batched BLAS/LAPACK calls. Their OpenMP threading
costs more than it gains (and degrades badly when the cores are shared with other processes), so
on CPU a public op runs with one intra-op thread and spreads independent chunks over a thread pool
with as many workers as the caller had intra-op threads. Off CPU, inside the pool, or with
``config.parallel_linalg = False`` everything runs inline.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

from lightning_struct.ops.spectral._config import config

T_ = TypeVar("T_")
R_ = TypeVar("R_")

_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
_THREAD_PREFIX = "ls-linalg"
#: per calling thread: the intra-op threads it had before a public op made it single-threaded
_STATE = threading.local()


def _pool(n: int) -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers < n:  # type: ignore[attr-defined]
            _POOL = ThreadPoolExecutor(max_workers=n, thread_name_prefix=_THREAD_PREFIX)
        return _POOL


@contextmanager
def _single_threaded() -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextmanager
def all_threads() -> Iterator[None]:
    """Inside a :func:`cpu_single_threaded` op: the caller's intra-op threads back, for one big GEMM."""
    saved = getattr(_STATE, "threads", None)
    if saved is None or in_pool():
        yield
        return
    torch.set_num_threads(saved)
    try:
        yield
    finally:
        torch.set_num_threads(1)


def cpu_single_threaded(fn: Callable[..., R_]) -> Callable[..., R_]:
    """Run a public op with single-threaded torch ops on CPU; :func:`parallel_map` / :func:`batched`
    then spread independent chunks over the pool (one worker per intra-op thread it had)."""

    @functools.wraps(fn)
    def wrapper(weight: torch.Tensor, *args: object, **kwargs: object) -> R_:
        if (
            not config.parallel_linalg
            or not isinstance(weight, torch.Tensor)
            or weight.device.type != "cpu"
            or getattr(_STATE, "threads", None) is not None
            or in_pool()
        ):
            return fn(weight, *args, **kwargs)
        _STATE.threads = torch.get_num_threads()
        try:
            with _single_threaded():
                return fn(weight, *args, **kwargs)
        finally:
            _STATE.threads = None

    return wrapper


def in_pool() -> bool:
    """True on a worker thread of the pool."""
    return threading.current_thread().name.startswith(_THREAD_PREFIX)


def workers(device: torch.device | str) -> int:
    """Threads used by :func:`parallel_map` (1 off CPU, inside the pool, or when disabled)."""
    if not config.parallel_linalg or torch.device(device).type != "cpu" or in_pool():
        return 1
    saved = getattr(_STATE, "threads", None)
    return max(1, saved if saved is not None else torch.get_num_threads())


def parallel_map(fn: Callable[[T_], R_], items: Sequence[T_], device: torch.device | str) -> list[R_]:
    """``[fn(x) for x in items]``, on CPU spread over the pool with single-threaded torch ops."""
    n = workers(device)
    if n < 2 or len(items) < 2:
        return [fn(x) for x in items]
    with _single_threaded():
        return list(_pool(n).map(fn, items))


def batched(fn: Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, ...]], x: torch.Tensor):
    """``fn(x)`` for a batched LAPACK ``fn``; on CPU split over threads with single-threaded LAPACK."""
    threads = workers(x.device)
    batch = x.shape[:-2]
    n_batch = math.prod(batch)
    if threads < 2 or n_batch < 2 * threads:
        return fn(x)
    flat = x.reshape(n_batch, *x.shape[-2:])
    parts = flat.tensor_split(threads)
    with _single_threaded():
        results = list(_pool(threads).map(fn, parts))
    if isinstance(results[0], tuple):
        return tuple(
            torch.cat([r[j] for r in results]).reshape(*batch, *results[0][j].shape[1:])
            for j in range(len(results[0]))
        )
    return torch.cat(results).reshape(*batch, *results[0].shape[1:])
