"""Plain-torch forms of the fast kernels, for tracers (``torch.export``, ONNX, ``torch.compile``, ``jit.trace``).

The eager kernels of :mod:`.acdc` and :mod:`.fftconv` are hand-written ``autograd.Function`` s that
use ``out=`` workspaces, cached index/twiddle tables and cached kernel spectra keyed on
``data_ptr``: all of that is fast in eager PyTorch and meaningless to a tracer (FakeTensors have no
data pointer, a cached table would be baked into the graph at one shape). Under a tracer the
modules call the functions here instead. They compute the same maps with ordinary differentiable
ops, build every shape-dependent table *inside* the graph from the traced sizes, keep complex
numbers only between an ``rfft`` and its ``irfft`` (real arithmetic on ``view_as_real`` elsewhere:
the ONNX exporter has no complex elementwise ops, its ``DFT`` covers the FFTs), and cache nothing.

* :func:`is_tracing` - whether a tracer is running (then the modules switch here).
* :func:`dct_portable` / :func:`idct_portable` - orthonormal DCT-II / DCT-III over the last axis,
  by one real FFT (Makhoul's reordering, as :mod:`.dct`), or by a given dense DCT matrix.
* :func:`acdc_stack_portable` - :func:`.acdc.acdc_stack` (same arguments, same result).
* :func:`fft_conv_portable` - ``F.conv1d`` / ``F.conv2d`` on an explicitly padded input by FFT on
  the padded input's own grid (a valid correlation never wraps around there), so it is exact at
  every traced input size.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "acdc_stack_portable",
    "dct_portable",
    "fft_conv_portable",
    "idct_portable",
    "is_tracing",
]


def is_tracing() -> bool:
    """True under ``torch.compile`` / ``torch.export`` (strict and non-strict), the ONNX exporters and ``jit.trace``."""
    return bool(torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export())


def _twiddles(n: int, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``cos theta_k``, ``sin theta_k`` and ``s_k`` (``k = 0 .. n//2``) of the packed DCT, built in the graph."""
    k = torch.arange(n // 2 + 1, device=like.device, dtype=like.dtype)
    theta = k * (math.pi / (2 * n))
    s = torch.where(k == 0, math.sqrt(1.0 / n), math.sqrt(2.0 / n)).to(like.dtype)
    return torch.cos(theta), torch.sin(theta), s


def dct_portable(x: Tensor, matrix: Tensor | None = None) -> Tensor:
    """Orthonormal DCT-II over the last axis (``scipy.fft.dct(x, norm="ortho")``).

    ``matrix``: the dense DCT matrix ``C`` (``dct_matrix(n)``) to compute ``x @ C.T`` instead of the FFT.
    """
    if matrix is not None:
        return x @ matrix.T
    n = x.shape[-1]
    v = torch.cat([x[..., ::2], x[..., 1::2].flip(-1)], dim=-1)
    spec = torch.view_as_real(torch.fft.rfft(v, dim=-1))
    c, s, scale = _twiddles(n, x)
    vr, vi = spec[..., 0], spec[..., 1]
    pr = (vr * c + vi * s) * scale  # p = s exp(-i theta) V: the packed DCT, X[k] - i X[n-k]
    pi = (vi * c - vr * s) * scale
    return torch.cat([pr, pi[..., 1 : (n + 1) // 2].flip(-1).neg()], dim=-1)


def idct_portable(x: Tensor, matrix: Tensor | None = None) -> Tensor:
    """Orthonormal DCT-III over the last axis, the inverse of :func:`dct_portable` (``x @ C`` with ``matrix``)."""
    if matrix is not None:
        return x @ matrix
    n = x.shape[-1]
    half = (n + 1) // 2
    pr = x[..., : n // 2 + 1]
    pi = torch.cat([torch.zeros_like(x[..., :1]), x[..., half:].flip(-1)], dim=-1).neg()
    c, s, scale = _twiddles(n, x)
    qr = (pr * c - pi * s) / scale  # q = p exp(+i theta) / s
    qi = (pr * s + pi * c) / scale
    v = torch.fft.irfft(torch.view_as_complex(torch.stack([qr, qi], dim=-1)), n=n, dim=-1)
    even, odd = v[..., :half], v[..., half:].flip(-1)
    if n % 2:
        odd = torch.cat([odd, torch.zeros_like(v[..., :1])], dim=-1)
    return torch.stack([even, odd], dim=-1).flatten(-2)[..., :n]


def acdc_stack_portable(
    x: Tensor,
    a: Tensor,
    d: Tensor,
    a_bias: Tensor | None = None,
    d_bias: Tensor | None = None,
    permutations: Tensor | None = None,
    relu: bool = False,
    *,
    dct_matrix: Tensor | None = None,
) -> Tensor:
    """:func:`lightning_struct.ops.acdc.acdc_stack`, written with plain differentiable ops.

    ``dct_matrix``: compute each DCT as a product with this ``(N, N)`` matrix instead of by FFT (the
    faster choice in some runtimes for small ``N``). Half-precision parameters compute in float32.
    """
    dtype = torch.float32 if a.dtype in (torch.float16, torch.bfloat16) else a.dtype
    h = x.to(dtype)
    mat = dct_matrix.to(dtype) if dct_matrix is not None else None
    k_total = a.shape[0]
    for k in range(k_total):
        h = h * a[k].to(dtype)
        if a_bias is not None:
            h = h + a_bias[k].to(dtype)
        y = dct_portable(h, mat) * d[k].to(dtype)
        if d_bias is not None:
            y = y + d_bias[k].to(dtype)
        h = idct_portable(y, mat)
        if k < k_total - 1:
            if relu:
                h = torch.relu(h)
            if permutations is not None:
                h = h.index_select(-1, permutations[k])
    return h


def _dilate(w: Tensor, dilation: tuple[int, ...]) -> Tensor:
    """Insert ``dilation - 1`` zeros between the kernel taps of the trailing spatial axes."""
    nd = len(dilation)
    for i, dil in enumerate(dilation):
        if dil == 1:
            continue
        axis = w.ndim - nd + i
        k = w.shape[axis]
        wz = torch.stack([w] + [torch.zeros_like(w)] * (dil - 1), dim=axis + 1)
        w = wz.flatten(axis, axis + 1).narrow(axis, 0, dil * (k - 1) + 1)
    return w


def fft_conv_portable(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
    groups: int,
) -> Tensor:
    """Valid cross-correlation (``F.conv{1,2}d`` with ``padding=0``) of a batched input by FFT.

    ``x``: ``(B, C_in, *spatial)``, already padded the way the layer pads; the grid is the padded
    input's own size, so no output that is kept reads a wrapped-around sample.
    """
    nd = weight.ndim - 2
    dims = tuple(range(-nd, 0))
    size = x.shape[-nd:]
    dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    xw = x.to(dtype)
    w = _dilate(weight.to(dtype), dilation)
    span = w.shape[-nd:]
    pad: list[int] = []
    for i in reversed(range(nd)):
        pad += [0, size[i] - span[i]]
    wg = torch.nn.functional.pad(w, pad)
    xs = torch.view_as_real(torch.fft.rfftn(xw, dim=dims))  # (B, C_in, *grid_half, 2)
    ks = torch.view_as_real(torch.fft.rfftn(wg, dim=dims))  # (C_out, C_in/g, *grid_half, 2)
    b, c_in = x.shape[0], x.shape[1]
    c_out = weight.shape[0]
    freq = xs.shape[2:-1]
    xs = xs.reshape(b, groups, c_in // groups, *freq, 2)
    ks = ks.reshape(groups, c_out // groups, c_in // groups, *freq, 2)
    letters = "hwd"[:nd]
    eq = f"bgc{letters},goc{letters}->bgo{letters}"
    xr, xi = xs[..., 0], xs[..., 1]
    kr, ki = ks[..., 0], ks[..., 1]
    # correlation: Y = X * conj(K)
    yr = torch.einsum(eq, xr, kr) + torch.einsum(eq, xi, ki)
    yi = torch.einsum(eq, xi, kr) - torch.einsum(eq, xr, ki)
    ys = torch.view_as_complex(torch.stack([yr, yi], dim=-1).reshape(b, c_out, *freq, 2))
    y = torch.fft.irfftn(ys, s=size, dim=dims)
    for i in range(nd):
        axis = 2 + i
        y = y.narrow(axis, 0, size[i] - span[i] + 1)
        if stride[i] > 1:
            y = _subsample(y, axis, stride[i])
    if bias is not None:
        y = y + bias.to(dtype).reshape(1, -1, *([1] * nd))
    return y.to(x.dtype)


def _subsample(y: Tensor, axis: int, step: int) -> Tensor:
    index = [slice(None)] * y.ndim
    index[axis] = slice(None, None, step)
    return y[tuple(index)]
