"""Eigenvalues of many Hermitian matrices through SciPy's LAPACK, one call per matrix, GIL released.

With torch wheels that link MKL, OpenBLAS's ``cheevd`` (the LAPACK that SciPy ships) can be faster
than the MKL ``cheevd`` behind ``torch.linalg.eigvalsh`` for matrices of about a hundred rows and
more, and slower for smaller ones: hence the threshold ``config.scipy_lapack_from``. The routines are
reached through SciPy's public Cython LAPACK API (``scipy.linalg.cython_lapack``: function
pointers in ``__pyx_capi__``, the same route numba takes) and called with :mod:`ctypes`, which
releases the GIL, so the thread pool of :mod:`lightning_struct.ops.spectral` runs them in
parallel. One workspace per call, no large allocation per matrix.

A row-major Hermitian matrix read as column-major is its transpose, ``conj(G)``, which has the
same eigenvalues; so the batch is passed as is (``uplo="L"``, ``jobz="N"``).
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch

__all__ = ["available", "eigvalsh"]

_P = ctypes.c_void_p
_LOCK = threading.Lock()
_FUNCS: dict[str, Callable[..., None]] | None = None
_CONTROLLER = None

# dtype -> (LAPACK routine, number of pointer arguments)
_ROUTINES = {
    torch.complex64: ("cheevd", 13),
    torch.complex128: ("zheevd", 13),
    torch.float32: ("ssyevd", 11),
    torch.float64: ("dsyevd", 11),
}


def _load() -> dict[str, Callable[..., None]]:
    global _FUNCS
    with _LOCK:
        if _FUNCS is not None:
            return _FUNCS
        funcs: dict[str, Callable[..., None]] = {}
        try:
            import scipy.linalg.cython_lapack as cl

            get_name = ctypes.pythonapi.PyCapsule_GetName
            get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
            get_ptr = ctypes.pythonapi.PyCapsule_GetPointer
            get_ptr.restype, get_ptr.argtypes = _P, [ctypes.py_object, ctypes.c_char_p]
            for name, nargs in _ROUTINES.values():
                cap = cl.__pyx_capi__[name]
                ptr = get_ptr(cap, get_name(cap))
                funcs[name] = ctypes.CFUNCTYPE(None, *([_P] * nargs))(ptr)
        except Exception:  # no SciPy, or a SciPy without these capsules: callers fall back to torch
            funcs = {}
        _FUNCS = funcs
        return funcs


def available(dtype: torch.dtype) -> bool:
    """True if the LAPACK route exists for ``dtype`` (complex64/128, float32/64)."""
    return dtype in _ROUTINES and _ROUTINES[dtype][0] in _load()


def one_blas_thread() -> AbstractContextManager[object]:
    """Limit SciPy's BLAS to one thread (our pool runs one matrix per core instead)."""
    global _CONTROLLER
    try:
        if _CONTROLLER is None:
            from threadpoolctl import ThreadpoolController

            _load()  # SciPy's BLAS must be loaded before the controller looks for it
            _CONTROLLER = ThreadpoolController()
        return _CONTROLLER.limit(limits=1, user_api="blas")
    except Exception:
        return nullcontext()


def eigvalsh(G: torch.Tensor) -> torch.Tensor:
    """Ascending eigenvalues of each Hermitian (symmetric) ``G[i]``; ``G`` is overwritten.

    Args:
        G: ``(B, n, n)`` contiguous CPU tensor, complex64/complex128/float32/float64.

    Returns:
        ``(B, n)`` real tensor of the matching precision.

    Raises:
        RuntimeError: LAPACK reports a failure (``info != 0``) for a matrix.
    """
    name, _ = _ROUTINES[G.dtype]
    fn = _load()[name]
    if G.ndim != 3 or G.shape[-1] != G.shape[-2] or not G.is_contiguous() or G.device.type != "cpu":
        raise ValueError(f"eigvalsh: expected a contiguous CPU (B, n, n) tensor, got {tuple(G.shape)}")
    B, n = G.shape[0], G.shape[-1]
    rdt = torch.float64 if G.dtype in (torch.complex128, torch.float64) else torch.float32
    w = torch.empty(B, n, dtype=rdt)
    if B == 0 or n == 0:
        return w
    byref = ctypes.byref
    jobz, uplo = ctypes.c_char(b"N"), ctypes.c_char(b"L")
    N, info = ctypes.c_int(n), ctypes.c_int(0)
    complex_ = G.is_complex()
    # workspace query
    work, rwork, iwork = torch.empty(2, dtype=G.dtype), torch.empty(2, dtype=rdt), torch.empty(2, dtype=torch.int32)
    lw, lrw, liw = ctypes.c_int(-1), ctypes.c_int(-1), ctypes.c_int(-1)
    probe = G[0].clone()

    def call(a: int, wp: int) -> None:
        if complex_:
            fn(byref(jobz), byref(uplo), byref(N), _P(a), byref(N), _P(wp), _P(work.data_ptr()), byref(lw),
               _P(rwork.data_ptr()), byref(lrw), _P(iwork.data_ptr()), byref(liw), byref(info))  # fmt: skip
        else:
            fn(byref(jobz), byref(uplo), byref(N), _P(a), byref(N), _P(wp), _P(work.data_ptr()), byref(lw),
               _P(iwork.data_ptr()), byref(liw), byref(info))  # fmt: skip

    call(probe.data_ptr(), w.data_ptr())
    lw = ctypes.c_int(max(1, int(work[0].real)))
    lrw = ctypes.c_int(max(1, int(rwork[0]))) if complex_ else lrw
    liw = ctypes.c_int(max(1, int(iwork[0])))
    work = torch.empty(lw.value, dtype=G.dtype)
    rwork = torch.empty(lrw.value if complex_ else 1, dtype=rdt)
    iwork = torch.empty(liw.value, dtype=torch.int32)
    base, stride = G.data_ptr(), n * n * G.element_size()
    wbase, wstride = w.data_ptr(), n * w.element_size()
    for i in range(B):
        call(base + i * stride, wbase + i * wstride)
        if info.value != 0:
            raise RuntimeError(f"LAPACK {name} failed on matrix {i} of {B} (info={info.value})")
    return w
