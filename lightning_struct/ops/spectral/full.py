"""Every singular value of a convolution (per frequency) and of a linear layer."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F

from lightning_struct._checks import check_choice
from lightning_struct.ops.spectral._config import config
from lightning_struct.ops.spectral._pool import all_threads, cpu_single_threaded, parallel_map, workers
from lightning_struct.ops.spectral.eigen import _eigvalsh_desc, _scipy_blas_guard, _svd, _svdvals
from lightning_struct.ops.spectral.geometry import (
    _check_weight,
    _complex,
    _compute_dtype,
    _Geom,
    _geometry,
    _multiplicity,
)
from lightning_struct.ops.spectral.gram import _chunk_maker, _gram_side, _gram_taps, _use_gram_taps
from lightning_struct.ops.spectral.result import ConvSpectrum, _reshape_sigma_max
from lightning_struct.ops.spectral.symbols import _kernel_taps, _symbol_chunk

__all__ = ["Method", "conv_singular_values", "conv_spectrum", "gram_symbols", "linear_spectrum", "solve_gram_symbols"]

Method = Literal["auto", "gram", "svd"]


def _row_chunks(geom: _Geom, half: bool, bytes_per_freq: int, device: torch.device) -> list[torch.Tensor]:
    """Coarse indices of dim 0 in chunks of about ``config.chunk_bytes`` of symbol (all other dims
    whole), and at least as many chunks as there are workers (when there are enough rows)."""
    sizes = geom.grid(half)
    per_row = math.prod(sizes[1:])
    rows = max(1, config.chunk_bytes // max(1, per_row * bytes_per_freq))
    rows = max(1, min(rows, -(-sizes[0] // workers(device))))
    first = torch.arange(sizes[0], device=device)
    return [first[start : start + rows] for start in range(0, sizes[0], rows)]


def _symbol_source(
    weight: torch.Tensor, geom: _Geom, wg: torch.Tensor, pos: Any, cdt: torch.dtype, method: str
) -> tuple[Callable[[torch.Tensor], torch.Tensor], list[torch.Tensor], bool]:
    """What the solver factorizes, chunk by chunk: ``(make, chunks, constant)``; ``make(chunk)`` is
    the block symbol (``method="svd"``) or the smaller-side Gram symbol (``"gram"``) of those
    frequencies. ``constant``: a 1x1 kernel, one symbol for every frequency (one chunk)."""
    if all(k == 1 for k in geom.k):
        # a 1x1 kernel: B = S^{-1/2} [W | ... | W] at every frequency, so sigma(B) = sigma(W) + zeros
        Wm = wg.reshape(geom.g, geom.co, geom.ci)[None]
        const = Wm if method == "svd" else (Wm @ Wm.mT if geom.co <= geom.ci else Wm.mT @ Wm)
        return (lambda i: const), [torch.zeros(1, dtype=torch.int64)], True
    n_half = math.prod(geom.grid(True))
    use_taps = method == "gram" and _use_gram_taps(geom, n_half, passes=None)
    with all_threads():  # one large GEMM: MKL threads it well
        gram_taps = _gram_taps(wg, geom, _gram_side(geom)) if use_taps else None
    make = _chunk_maker(geom, wg, pos, cdt, "gram" if method == "gram" else "symbol", gram_taps)
    itemsize = torch.empty((), dtype=cdt).element_size()
    return make, _row_chunks(geom, True, geom.g * geom.co * geom.cols * itemsize, weight.device), False


@cpu_single_threaded
def conv_spectrum(
    weight: torch.Tensor,
    input_size: int | Sequence[int],
    *,
    stride: int | Sequence[int] = 1,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    method: Method = "auto",
    compute_uv: bool = False,
    dtype: torch.dtype | None = None,
) -> ConvSpectrum:
    """All singular values of the periodic-boundary convolution, per frequency.

    Args:
        weight: ``(C_out, C_in/groups, *kernel)``, 1-3 spatial dims, real; any device.
        input_size: spatial size of the layer's input ``(n_1, ..., n_d)`` (or one int).
        stride, dilation, groups: as in ``nn.Conv*d``; every ``n_i`` must be divisible by ``stride_i``.
        method: ``"gram"`` (eigenvalues of the smaller-side Gram symbol; fast, absolute accuracy
            ~``sqrt(10 eps) sigma_max``), ``"svd"`` (singular values of the block symbol;
            accuracy ~``eps sigma_max``) or ``"auto"``: ``"gram"`` in float32, ``"svd"`` in float64
            (float64 is asked for exactness). See the package docstring.
        compute_uv: also return per-frequency singular vectors (forces ``method="svd"``). For
            stride 1 the ``k``-th right singular vector of the operator at frequency ``theta`` is
            the input ``x[c, p] = vh[f, g, k, c].conj() * exp(i theta . p) / sqrt(N)`` (and ``u`` likewise on
            the output): see :func:`frequency_mode`.
        dtype: ``torch.float32`` (default; float64 weights stay float64) or ``torch.float64``.

    Returns:
        :class:`ConvSpectrum` (singular values ``(F, G, r)`` on the half grid + multiplicities).

    Raises:
        TypeError / ValueError: bad weight (non-real, empty, NaN/inf), sizes, stride, groups.
    """
    check_choice(method, "method", ("auto", "gram", "svd"))
    geom = _geometry(weight, input_size, stride, dilation, groups)
    rdt = _compute_dtype(weight, dtype)
    cdt = _complex(rdt)
    if method == "auto":
        method = "svd" if rdt == torch.float64 else "gram"
    wg, pos = _kernel_taps(weight, geom, rdt)
    if compute_uv:
        method = "svd"
    c_small = min(geom.co, geom.cols)
    sig, us, vhs = [], [], []
    make, chunks, constant = _symbol_source(weight, geom, wg, pos, cdt, method)

    def work(idx0: torch.Tensor) -> tuple[torch.Tensor, ...]:
        M = make(idx0)
        if method == "gram":
            return (_eigvalsh_desc(M, overwrite=True).clamp_min(0).sqrt(),)
        if compute_uv:
            U, Sv, Vh = _svd(M)
            return Sv, U, Vh
        return (_svdvals(M),)

    with _scipy_blas_guard(c_small if method == "gram" else 0, weight.device):
        outs = parallel_map(work, list(chunks), weight.device)
    for out in outs:
        sig.append(out[0])
        if compute_uv:
            us.append(out[1])
            vhs.append(out[2])
    if constant:
        n_half = math.prod(geom.grid(True))
        zeros = geom.r - min(geom.co, geom.ci)
        one = F.pad(sig[0], (0, zeros))  # (1, G, r)
        sig = [one.expand(n_half, *one.shape[1:])]
        if compute_uv:
            # singular vectors of B from those of W: u unchanged, v = S^{-1/2} [v | ... | v] (+ complements)
            U, Sv, Vh = _svd(
                _symbol_chunk(
                    wg,
                    geom.n,
                    geom.s,
                    [torch.zeros(1, dtype=torch.int64, device=weight.device)] * geom.d,
                    pos,
                    cdt,
                )
                * geom.S**-0.5
            )
            us = [U.expand(n_half, *U.shape[1:])]
            vhs = [Vh.expand(n_half, *Vh.shape[1:])]
    return ConvSpectrum(
        sigma=torch.cat(sig),
        multiplicity=_multiplicity(geom, weight.device),
        grid=geom.m,
        reshape_sigma_max=functools.partial(_reshape_sigma_max, weight.detach().to(rdt), geom.g),
        kernel_numel=math.prod(geom.k),
        method=method,
        u=torch.cat(us) if compute_uv else None,
        vh=torch.cat(vhs) if compute_uv else None,
    )


def conv_singular_values(
    weight: torch.Tensor,
    input_size: int | Sequence[int],
    *,
    stride: int | Sequence[int] = 1,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    method: Method = "auto",
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Every singular value of the periodic-boundary convolution operator, 1-D, descending.

    ``len == min(C_out * N / S, C_in * N)`` (``N = prod(input_size)``, ``S = prod(stride)``).
    Arguments as in :func:`conv_spectrum`; float64 weights (or ``dtype=torch.float64``) give
    float64 values.
    """
    return conv_spectrum(
        weight, input_size, stride=stride, dilation=dilation, groups=groups, method=method, dtype=dtype
    ).values()


@cpu_single_threaded
def linear_spectrum(weight: torch.Tensor, *, dtype: torch.dtype | None = None) -> ConvSpectrum:
    """Singular values of an ``nn.Linear`` weight ``(out, in)`` (plain SVD) as a :class:`ConvSpectrum`."""
    _check_weight(weight)
    if weight.ndim != 2:
        raise ValueError(f"linear weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    rdt = _compute_dtype(weight, dtype)
    w = weight.detach().to(rdt)
    sigma = torch.linalg.svdvals(w)
    return ConvSpectrum(
        sigma=sigma.reshape(1, 1, -1),
        multiplicity=torch.ones(1, dtype=torch.int64, device=weight.device),
        grid=(1,),
        reshape_sigma_max=sigma[0],
        kernel_numel=1,
        method="linear",
    )


@cpu_single_threaded
def gram_symbols(
    weight: torch.Tensor,
    input_size: int | Sequence[int],
    *,
    stride: int | Sequence[int] = 1,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
) -> list[torch.Tensor]:
    """The Hermitian Gram symbols, chunk by chunk, that ``conv_spectrum(method="gram")`` hands to
    its eigenvalue solver (half grid, smaller side): for benchmarks that time the solver alone.

    A kernel of size 1 has one symbol for every frequency and is returned as that one matrix.
    """
    geom = _geometry(weight, input_size, stride, dilation, groups)
    rdt = _compute_dtype(weight, None)
    wg, pos = _kernel_taps(weight, geom, rdt)
    make, chunks, _ = _symbol_source(weight, geom, wg, pos, _complex(rdt), "gram")
    return parallel_map(make, chunks, weight.device)


def solve_gram_symbols(symbols: list[torch.Tensor]) -> list[torch.Tensor]:
    """The eigenvalue solver ``conv_spectrum(method="gram")`` uses, alone, on ready symbols (each
    chunk is overwritten: pass copies), in the same thread pool."""
    c_small = symbols[0].shape[-1] if symbols else 0
    device = symbols[0].device if symbols else torch.device("cpu")
    with _scipy_blas_guard(c_small, device):
        return parallel_map(lambda M: _eigvalsh_desc(M, overwrite=True), symbols, device)
