"""Orthonormal DCT-II and its inverse (DCT-III) via one real FFT (Makhoul's reordering).

Definitions (``n`` = length of the transformed axis, ``k, m = 0 .. n-1``)::

    dct(x)[k] = s_k * sum_m x[m] * cos(pi * k * (2m + 1) / (2n)),
    s_0 = sqrt(1/n),  s_k = sqrt(2/n) for k >= 1.

This is ``scipy.fft.dct(x, type=2, norm="ortho")``; the matrix ``C[k, m]`` of the transform
(:func:`dct_matrix`) is orthogonal, so the inverse is its transpose, the orthonormal DCT-III
(``scipy.fft.idct(X, type=2, norm="ortho")``), and the adjoint of each transform is the other.

Algorithm (Makhoul 1980), for any ``n`` (odd or even):

1. reorder ``v = [x[0], x[2], x[4], ..., x[5], x[3], x[1]]`` (even samples, then odd samples
   reversed);
2. ``V = rfft(v)`` (``n//2 + 1`` complex numbers, conjugate symmetry of a real input);
3. with ``theta_k = pi k / (2n)`` and ``p_k = s_k exp(-i theta_k) V_k``:
   ``dct(x)[k] = Re p_k`` for ``k = 0 .. n//2`` and ``dct(x)[n-k] = -Im p_k`` for
   ``k = 1 .. (n-1)//2``. (Both formulas agree at ``k = n/2`` when ``n`` is even.)

So the half spectrum ``p`` *is* the DCT, packed as ``p_k = X[k] - i X[n-k]`` (``X[n] := 0``):
:func:`packed_to_dct` / :func:`dct_to_packed` convert between the two. The inverse runs the
steps backwards: pack, multiply by ``exp(+i theta_k) / s_k``, ``irfft``, undo the reordering.
One real FFT of length ``n`` per transform; no complex FFT of length ``n``, no length ``2n``
or ``4n`` padding. :mod:`lightning_struct.ops.acdc` works directly in the packed domain.

Autograd: :func:`dct` and :func:`idct` are ``torch.autograd.Function`` s whose backward is the
other transform (the adjoint of an orthogonal map is its inverse), so a backward pass costs
one FFT, and double backward works.

Dtypes: float32 and float64 (complex64 / complex128 internally). float16 and bfloat16 inputs
are transformed in float32 and cast back. Integer and complex inputs raise ``TypeError``.
Devices: whatever ``torch.fft`` supports (CPU, CUDA).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "dct",
    "dct_matrix",
    "dct_to_packed",
    "idct",
    "makhoul_index",
    "packed_to_dct",
    "packed_twiddles",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _check_input(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} expects a torch.Tensor, got {type(x).__name__}")
    if x.is_complex() or not x.is_floating_point():
        raise TypeError(f"{name} expects a real floating-point tensor, got dtype {x.dtype}")
    if x.ndim == 0:
        raise ValueError(f"{name} expects at least one dimension, got a 0-d tensor")


def _normalize_dim(x: Tensor, dim: int, name: str) -> int:
    if not -x.ndim <= dim < x.ndim:
        raise ValueError(f"{name}: dim={dim} is out of range for a tensor with {x.ndim} dimensions")
    return dim % x.ndim


@dataclass(frozen=True)
class _Twiddles:
    forward: Tensor  # (n//2+1,) complex: s_k exp(-i theta_k)
    inverse: Tensor  # (n//2+1,) complex: exp(+i theta_k) / s_k


@functools.lru_cache(maxsize=128)
def _twiddles(n: int, dtype: torch.dtype, device: torch.device) -> _Twiddles:
    k = torch.arange(n // 2 + 1, dtype=torch.float64)
    theta = math.pi * k / (2 * n)
    s = torch.full_like(k, math.sqrt(2.0 / n))
    s[0] = math.sqrt(1.0 / n)
    cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    fwd = torch.polar(s, -theta).to(device=device, dtype=cdtype)
    inv = torch.polar(1.0 / s, theta).to(device=device, dtype=cdtype)
    return _Twiddles(fwd, inv)


def packed_twiddles(n: int, dtype: torch.dtype = torch.float32, device: Any = "cpu") -> tuple[Tensor, Tensor]:
    """The two complex twiddle vectors of the packed DCT of length ``n`` (cached).

    Args:
        n: transform length (>= 1).
        dtype: real dtype of the data (float32 -> complex64, float64 -> complex128).
        device: where the tables live.

    Returns:
        ``(forward, inverse)``, each of shape ``(n//2 + 1,)``: ``forward[k] = s_k exp(-i pi k/(2n))``
        (``rfft`` of the reordered signal times ``forward`` is the packed DCT) and
        ``inverse[k] = exp(+i pi k/(2n)) / s_k`` (packed DCT times ``inverse``, then ``irfft``,
        gives the reordered signal back).
    """
    if n < 1:
        raise ValueError(f"packed_twiddles: n must be >= 1, got {n}")
    t = _twiddles(int(n), dtype, torch.device(device))
    return t.forward, t.inverse


@functools.lru_cache(maxsize=128)
def _makhoul_index(n: int, device: torch.device) -> tuple[Tensor, Tensor]:
    order = torch.cat([torch.arange(0, n, 2), torch.arange(1, n, 2).flip(0)])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(n)
    return order.to(device), inverse.to(device)


def makhoul_index(n: int, device: Any = "cpu") -> tuple[Tensor, Tensor]:
    """Makhoul's reordering as gather indices (cached).

    Returns:
        ``(order, inverse)``, int64 of shape ``(n,)``: ``v = x[..., order]`` is
        ``[x0, x2, x4, ..., x3, x1]`` and ``x = v[..., inverse]``.
    """
    if n < 1:
        raise ValueError(f"makhoul_index: n must be >= 1, got {n}")
    return _makhoul_index(int(n), torch.device(device))


def _reorder(x: Tensor) -> Tensor:
    """``[x0, x2, ..., x3, x1]`` along the last axis (one copy)."""
    return torch.cat([x[..., ::2], x[..., 1::2].flip(-1)], dim=-1)


def _unreorder(v: Tensor) -> Tensor:
    """Inverse of :func:`_reorder` (one copy)."""
    n = v.shape[-1]
    half = (n + 1) // 2
    out = torch.empty_like(v)
    out[..., ::2] = v[..., :half]
    out[..., 1::2] = v[..., half:].flip(-1)
    return out


def packed_to_dct(p: Tensor, n: int) -> Tensor:
    """Unpack ``p_k = X[k] - i X[n-k]`` (``k = 0 .. n//2``) into the real DCT ``X`` of length ``n``.

    Args:
        p: complex tensor ``(..., n//2 + 1)``.
        n: the DCT length.

    Returns:
        Real tensor ``(..., n)``.
    """
    if p.shape[-1] != n // 2 + 1:
        raise ValueError(f"packed_to_dct: last dim must be n//2+1 = {n // 2 + 1}, got {p.shape[-1]}")
    tail = p.imag[..., 1 : (n + 1) // 2].flip(-1)
    return torch.cat([p.real, tail.neg()], dim=-1)


def dct_to_packed(x: Tensor) -> Tensor:
    """Pack a real DCT ``X`` (``(..., n)``) into ``p_k = X[k] - i X[n-k]``, ``k = 0 .. n//2``.

    Returns:
        Complex tensor ``(..., n//2 + 1)`` (``Im p_0 = 0``; ``X[n]`` is taken as 0).
    """
    n = x.shape[-1]
    zero = x.new_zeros(x.shape[:-1] + (1,))
    imag = torch.cat([zero, x[..., (n + 1) // 2 :].flip(-1)], dim=-1).neg_()
    return torch.complex(x[..., : n // 2 + 1], imag)


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in _LOW_PRECISION else x.dtype


def _dct_last(x: Tensor) -> Tensor:
    """Orthonormal DCT-II over the last axis, no autograd bookkeeping."""
    n = x.shape[-1]
    orig = x.dtype
    x = x.to(_compute_dtype(x))
    fwd, _ = packed_twiddles(n, x.dtype, x.device)
    p = torch.fft.rfft(_reorder(x), dim=-1).mul_(fwd)
    return packed_to_dct(p, n).to(orig)


def _idct_last(x: Tensor) -> Tensor:
    """Orthonormal DCT-III (inverse of :func:`_dct_last`) over the last axis."""
    n = x.shape[-1]
    orig = x.dtype
    x = x.to(_compute_dtype(x))
    _, inv = packed_twiddles(n, x.dtype, x.device)
    v = torch.fft.irfft(dct_to_packed(x).mul_(inv), n=n, dim=-1)
    return _unreorder(v).to(orig)


class _DCTFunction(torch.autograd.Function):
    @staticmethod
    def forward(x: Tensor) -> Tensor:  # type: ignore[override]
        return _dct_last(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor], output: Tensor) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        return _IDCTFunction.apply(grad)


class _IDCTFunction(torch.autograd.Function):
    @staticmethod
    def forward(x: Tensor) -> Tensor:  # type: ignore[override]
        return _idct_last(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor], output: Tensor) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        return _DCTFunction.apply(grad)


def dct(x: Tensor, dim: int = -1) -> Tensor:
    """Orthonormal DCT-II of ``x`` along ``dim`` (``scipy.fft.dct(x, norm="ortho")``).

    Args:
        x: real tensor of any shape; the transformed axis may have any length >= 1.
        dim: axis to transform.

    Returns:
        Tensor of the same shape and dtype as ``x``.
    """
    _check_input(x, "dct")
    d = _normalize_dim(x, dim, "dct")
    if d == x.ndim - 1:
        return _DCTFunction.apply(x)
    return _DCTFunction.apply(x.movedim(d, -1)).movedim(-1, d)


def idct(x: Tensor, dim: int = -1) -> Tensor:
    """Orthonormal DCT-III of ``x`` along ``dim``, the inverse (and adjoint) of :func:`dct`.

    Equals ``scipy.fft.idct(x, norm="ortho")``.

    Args:
        x: real tensor of any shape.
        dim: axis to transform.

    Returns:
        Tensor of the same shape and dtype as ``x``.
    """
    _check_input(x, "idct")
    d = _normalize_dim(x, dim, "idct")
    if d == x.ndim - 1:
        return _IDCTFunction.apply(x)
    return _IDCTFunction.apply(x.movedim(d, -1)).movedim(-1, d)


def dct_matrix(n: int, dtype: torch.dtype = torch.float64, device: Any = None) -> Tensor:
    """Dense orthonormal DCT-II matrix ``C`` (``n x n``) with ``dct(x) == C @ x`` for a vector ``x``.

    A brute-force reference (O(n^2) memory); ``C @ C.T == I``.
    """
    if n < 1:
        raise ValueError(f"dct_matrix: n must be >= 1, got {n}")
    k = torch.arange(n, dtype=torch.float64)[:, None]
    m = torch.arange(n, dtype=torch.float64)[None, :]
    c = torch.cos(math.pi * k * (2 * m + 1) / (2 * n)) * math.sqrt(2.0 / n)
    c[0] /= math.sqrt(2.0)
    return c.to(dtype=dtype, device=device)
