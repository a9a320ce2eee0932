"""Batched eigenvalue and singular-value back-ends (torch, or SciPy's LAPACK for large CPU Grams).

CPU eigenvalues of Gram matrices of at least ``config.scipy_lapack_from`` rows go through SciPy's
LAPACK (:mod:`._lapack`, switch: ``config.use_scipy_lapack``); everything else, and every device
other than the CPU, uses ``torch.linalg``. Batches are split over the thread pool of :mod:`._pool`.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

import lightning_struct.ops.spectral._lapack as _lapack
from lightning_struct.ops.spectral._config import config
from lightning_struct.ops.spectral._pool import batched, in_pool


def _use_scipy_lapack(G: torch.Tensor) -> bool:
    return (
        config.use_scipy_lapack
        and G.device.type == "cpu"
        and G.shape[-1] >= config.scipy_lapack_from
        and _lapack.available(G.dtype)
    )


def _scipy_blas_guard(size: int, device: torch.device) -> AbstractContextManager[object]:
    """One BLAS thread for SciPy while CPU eigenvalues of ``size``-row Grams may take its LAPACK
    (the pool runs one matrix per thread instead); a no-op otherwise."""
    if config.use_scipy_lapack and device.type == "cpu" and size >= config.scipy_lapack_from and not in_pool():
        return _lapack.one_blas_thread()
    return nullcontext()


def _eigvalsh_desc(G: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
    """Eigenvalues of Hermitian ``G`` (..., c, c) in descending order, real dtype.

    ``overwrite``: ``G`` may be destroyed (saves a copy on the SciPy LAPACK route).
    """
    if _use_scipy_lapack(G):
        flat = G.reshape(-1, *G.shape[-2:])
        if flat.data_ptr() == G.data_ptr() and not overwrite:
            flat = flat.clone()  # LAPACK overwrites its input
        flat = flat.contiguous()
        with _lapack.one_blas_thread() if not in_pool() else nullcontext():
            values = batched(_lapack.eigvalsh, flat)
        return values.reshape(*G.shape[:-1]).flip(-1)
    return batched(torch.linalg.eigvalsh, G).flip(-1)


def _svdvals(B: torch.Tensor) -> torch.Tensor:
    return batched(torch.linalg.svdvals, B)


def _svd(B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return batched(lambda t: torch.linalg.svd(t, full_matrices=False), B)  # type: ignore[return-value]
