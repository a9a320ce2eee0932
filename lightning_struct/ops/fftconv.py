"""FFT convolution with the exact semantics of ``F.conv1d`` / ``F.conv2d`` (Mathieu et al. 2014).

``fft_conv2d(input, weight, bias, stride, padding, dilation, groups)`` returns what
``torch.nn.functional.conv2d`` returns (cross-correlation, zero padding, any stride, dilation
and groups), computed with real FFTs:

* **Grid.** Every transform lives on one ``N0 x N1`` grid, ``N`` the smallest 5-smooth size
  (``N1`` even) that holds the part of the padded input the output reads
  (``(n_out - 1) * stride + dilation * (k - 1) + 1``). Circular wrap-around then only touches
  grid points no kept output reads, so the result is exact. Zero padding is never materialised:
  the input sits at the grid origin and the padding offset is a phase of the kernel spectrum
  (the kernel is "rolled" by ``-padding``). ``padding_mode="circular"`` uses the input length
  itself as the period (native circular convolution, any padding/stride).
* **Kernel spectrum** ``K = conj(FFT(rolled, dilated kernel))`` is computed by *pruned* DFTs
  (two small GEMMs against ``exp(2 pi i k (u d - p) / N)`` matrices over the ``k`` taps) instead
  of FFTs of mostly-zero grids; dilation and the padding offset are just tap positions.
* **Channel products.** Per frequency ``Y[f] = X[f] @ K[f]^T`` is a ``(B x C_in/g) @ (C_in/g x
  C_out/g)`` complex matrix product; all frequencies (and groups) form the batch of one complex
  ``torch.bmm`` on frequency-major tensors ``(N0 * N1h * g, B, C/g)`` (one permute copy per
  transformed tensor). The spectrum is stored ``(.., C_out/g, C_in/g)`` and used transposed,
  and the backward products are arranged so that no operand needs a conjugate that BLAS cannot
  apply itself (a conjugated, non-transposed operand makes MKL's batched complex GEMM 2-3x
  slower). Depthwise-like layers (one input channel per group) use an elementwise product
  per channel instead.
* **Stride** along the height is folded into the frequency domain: with ``N0 = s * M0`` the
  subsampled output's spectrum is ``(1/s) sum_r Y[k + r M0]`` (aliasing), so the channel
  products accumulate over the ``s`` aliases and the inverse FFT runs on the ``M0 x N1`` coarse
  grid. Width stride subsamples the (smaller) inverse transform.
* **Backward** reuses transforms as Mathieu et al.: the forward input spectrum is saved for the
  weight gradient, the kernel spectrum serves the input gradient, and the output-gradient
  spectrum is computed once and used by both. Per frequency ``dX = dY K^H`` and
  ``dW = X^H dY`` (summed over the batch); the kernel taps of the weight gradient come out of a
  pruned inverse DFT.

Precision: float32 inputs compute in complex64, float64 in complex128. Half and bfloat16 inputs
(and autocast regions) compute in float32 and cast the result back to the dtype ``F.conv2d``
would return there. Double backward is not supported.

Shapes: input ``(B, C_in, H, W)`` or unbatched ``(C_in, H, W)``; weight
``(C_out, C_in / groups, kh, kw)``; output ``(B, C_out, H_out, W_out)`` with
``H_out = (H + pad_top + pad_bottom - dilation * (kh - 1) - 1) // stride + 1``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_struct._checks import check_choice, check_int, is_int

__all__ = [
    "FFTConvPlan",
    "KernelSpectrum",
    "fast_fft_size",
    "fft_conv1d",
    "fft_conv2d",
    "kernel_spectrum",
    "plan_fft_conv2d",
]

PaddingMode = Literal["zeros", "circular"]
_IntOrPair = int | Sequence[int]


# --------------------------------------------------------------------------------------------
# sizes and plans
# --------------------------------------------------------------------------------------------
def _is_5_smooth(n: int) -> bool:
    for p in (2, 3, 5):
        while n % p == 0:
            n //= p
    return n == 1


@functools.lru_cache(maxsize=4096)
def fast_fft_size(n: int, even: bool = False) -> int:
    """Smallest 5-smooth integer ``>= n`` (``2^a 3^b 5^c``), even if ``even``.

    Args:
        n: minimum length (``>= 1``).
        even: require an even size (used for the ``rfft`` axis).
    """
    if n < 1:
        raise ValueError(f"fast_fft_size: n={n} must be >= 1")
    m = n
    while not (_is_5_smooth(m) and (not even or m % 2 == 0)):
        m += 1
    return m


@dataclass(frozen=True)
class _Axis:
    """Geometry of one spatial axis of an FFT convolution.

    ``grid`` is the FFT length; the input's first ``used`` samples sit at grid positions
    ``[0, used)``; the output of index ``i`` is read at grid position ``i * stride`` (mod grid),
    or at coarse position ``i`` on the ``grid // fold`` grid when the stride is folded into the
    frequency domain.
    """

    n_in: int
    k: int
    stride: int
    dilation: int
    pad_left: int
    pad_right: int
    circular: bool
    n_out: int
    grid: int
    used: int
    fold: int
    out_slice: tuple[int, int, int] | None
    out_index: tuple[int, ...] | None

    @property
    def coarse(self) -> int:
        """Length of the grid the inverse FFT runs on."""
        return self.grid // self.fold


def _make_axis(
    n_in: int, k: int, s: int, d: int, pl: int, pr: int, circular: bool, *, allow_fold: bool, rfft_axis: bool
) -> _Axis:
    ke = d * (k - 1) + 1
    n_out = (n_in + pl + pr - ke) // s + 1
    if circular:
        grid, used = n_in, n_in
    else:
        extent = (n_out - 1) * s + ke  # padded samples the kept outputs read
        used = max(0, min(n_in, extent - pl))
        if allow_fold and s > 1:
            grid = s * fast_fft_size(-(-extent // s))
        else:
            grid = fast_fft_size(extent, even=rfft_axis)
    fold = s if (allow_fold and s > 1 and grid % s == 0 and (n_out - 1) * s < grid) else 1
    out_slice: tuple[int, int, int] | None = None
    out_index: tuple[int, ...] | None = None
    if fold > 1:
        out_slice = (0, n_out, 1)
    elif (n_out - 1) * s < grid:
        out_slice = (0, (n_out - 1) * s + 1, s)
    else:  # circular padding wider than the period: output positions wrap around
        out_index = tuple((i * s) % grid for i in range(n_out))
    return _Axis(n_in, k, s, d, pl, pr, circular, n_out, grid, used, fold, out_slice, out_index)


@dataclass(frozen=True)
class FFTConvPlan:
    """Everything about an FFT convolution that does not depend on the data.

    Attributes:
        axes: geometry of the height and width axes.
        groups: number of channel groups.
        c_in: input channels; ``c_out``: output channels.
        elementwise: one input channel per group (depthwise-like): per-channel products
            instead of channel GEMMs.
    """

    axes: tuple[_Axis, _Axis]
    groups: int
    c_in: int
    c_out: int

    @property
    def elementwise(self) -> bool:
        return self.c_in // self.groups == 1

    @property
    def out_hw(self) -> tuple[int, int]:
        return self.axes[0].n_out, self.axes[1].n_out

    @property
    def key(self) -> tuple:
        return (self.axes, self.groups, self.c_in, self.c_out)


@functools.lru_cache(maxsize=1024)
def _plan_cached(
    hw: tuple[int, int],
    k: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
    pads: tuple[tuple[int, int], tuple[int, int]],
    circular: bool,
    groups: int,
    c_in: int,
    c_out: int,
    fold: bool,
) -> FFTConvPlan:
    a0 = _make_axis(hw[0], k[0], stride[0], dilation[0], *pads[0], circular, allow_fold=fold, rfft_axis=False)
    a1 = _make_axis(hw[1], k[1], stride[1], dilation[1], *pads[1], circular, allow_fold=False, rfft_axis=True)
    return FFTConvPlan((a0, a1), groups, c_in, c_out)


# --------------------------------------------------------------------------------------------
# argument checking (mirrors F.conv2d's rules, with ValueError / TypeError)
# --------------------------------------------------------------------------------------------
def _tuple(value: _IntOrPair, n: int, name: str, *, minimum: int) -> tuple[int, ...]:
    if not (is_int(value) or (isinstance(value, Sequence) and not isinstance(value, str))):
        raise TypeError(f"{name} must be an int or a sequence of {n} ints, got {value!r}")
    vals = (value,) * n if is_int(value) else tuple(value)  # type: ignore[arg-type]
    if len(vals) == 1:
        vals = vals * n
    if len(vals) != n or not all(is_int(v) for v in vals):
        raise ValueError(f"{name} must be an int or a sequence of {n} ints, got {value!r}")
    if any(v < minimum for v in vals):
        raise ValueError(f"{name} must be >= {minimum} in every dimension, got {value!r}")
    return vals


def _resolve_padding(
    padding: str | _IntOrPair, k: tuple[int, ...], dilation: tuple[int, ...], stride: tuple[int, ...]
) -> tuple[tuple[int, int], ...]:
    n = len(k)
    if isinstance(padding, str):
        if padding == "valid":
            return ((0, 0),) * n
        if padding == "same":
            if any(s != 1 for s in stride):
                raise ValueError(
                    f"padding='same' is not supported for strided convolutions (stride={stride})"
                )
            out = []
            for kk, dd in zip(k, dilation):
                total = dd * (kk - 1)
                out.append((total // 2, total - total // 2))
            return tuple(out)
        raise ValueError(f"padding={padding!r}: allowed strings are 'same' and 'valid' (or ints)")
    p = _tuple(padding, n, "padding", minimum=0)
    return tuple((v, v) for v in p)


def _check(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: _IntOrPair,
    padding: str | _IntOrPair,
    dilation: _IntOrPair,
    groups: int,
    padding_mode: str,
    nd: int,
    fn: str,
) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...], tuple[int, ...], bool]:
    if not isinstance(input, Tensor) or not isinstance(weight, Tensor):
        raise TypeError(
            f"{fn}: input and weight must be tensors, got {type(input).__name__}, {type(weight).__name__}"
        )
    if bias is not None and not isinstance(bias, Tensor):
        raise TypeError(f"{fn}: bias must be a tensor or None, got {type(bias).__name__}")
    for name, t in (("input", input), ("weight", weight), ("bias", bias)):
        if t is not None and not t.is_floating_point():
            raise TypeError(f"{fn}: {name} must be a floating-point tensor, got dtype {t.dtype}")
    if input.dtype != weight.dtype or (bias is not None and bias.dtype != input.dtype):
        raise TypeError(
            f"{fn}: input ({input.dtype}), weight ({weight.dtype})"
            + (f" and bias ({bias.dtype})" if bias is not None else "")
            + " must have the same dtype"
        )
    if input.device != weight.device or (bias is not None and bias.device != input.device):
        raise ValueError(
            f"{fn}: input ({input.device}), weight ({weight.device}) and bias must be on one device"
        )
    if input.dim() not in (nd + 1, nd + 2):
        raise ValueError(
            f"{fn}: expected {nd + 1}D (unbatched) or {nd + 2}D (batched) input, got shape {tuple(input.shape)}"
        )
    if weight.dim() != nd + 2:
        raise ValueError(
            f"{fn}: expected a {nd + 2}D weight (C_out, C_in/groups, *k), got shape {tuple(weight.shape)}"
        )
    check_int(groups, "groups", fn, minimum=1)
    check_choice(padding_mode, "padding_mode", ("zeros", "circular"), fn)
    c_in = input.shape[-nd - 1]
    c_out = weight.shape[0]
    if c_out == 0 or c_out % groups != 0:
        raise ValueError(
            f"{fn}: out channels (weight.shape[0]={c_out}) must be a positive multiple of groups={groups}"
        )
    if weight.shape[1] * groups != c_in:
        raise ValueError(
            f"{fn}: input has {c_in} channels but weight {tuple(weight.shape)} with groups={groups} expects "
            f"{weight.shape[1] * groups} (= weight.shape[1] * groups)"
        )
    if bias is not None and tuple(bias.shape) != (c_out,):
        raise ValueError(f"{fn}: bias must have shape ({c_out},), got {tuple(bias.shape)}")
    k = tuple(int(v) for v in weight.shape[2:])
    if any(v < 1 for v in k):
        raise ValueError(f"{fn}: kernel size must be >= 1, got {k}")
    st = _tuple(stride, nd, "stride", minimum=1)
    dil = _tuple(dilation, nd, "dilation", minimum=1)
    pads = _resolve_padding(padding, k, dil, st)
    spatial = tuple(int(v) for v in input.shape[-nd:])
    for i in range(nd):
        ke = dil[i] * (k[i] - 1) + 1
        if spatial[i] + pads[i][0] + pads[i][1] < ke:
            raise ValueError(
                f"{fn}: padded input size {spatial[i] + pads[i][0] + pads[i][1]} in dimension {i} is smaller than "
                f"the dilated kernel size {ke}; kernel size can't be greater than the actual input size"
            )
        if padding_mode == "circular" and (pads[i][0] > spatial[i] or pads[i][1] > spatial[i]):
            raise ValueError(
                f"{fn}: circular padding {pads[i]} in dimension {i} wraps around more than once "
                f"(input size {spatial[i]})"
            )
    return st, pads, dil, padding_mode == "circular"


def plan_fft_conv2d(
    input_shape: Sequence[int],
    weight_shape: Sequence[int],
    stride: _IntOrPair = 1,
    padding: str | _IntOrPair = 0,
    dilation: _IntOrPair = 1,
    groups: int = 1,
    padding_mode: PaddingMode = "zeros",
    *,
    fold_stride: bool = True,
) -> FFTConvPlan:
    """The :class:`FFTConvPlan` of ``fft_conv2d`` for these shapes (input ``(B, C, H, W)``).

    ``fold_stride``: fold the height stride into the frequency domain (the default, see the
    module docstring) instead of subsampling the inverse transform; both are exact.
    """
    x = torch.empty(tuple(input_shape), device="meta")
    w = torch.empty(tuple(weight_shape), device="meta")
    st, pads, dil, circ = _check(
        x, w, None, stride, padding, dilation, groups, padding_mode, 2, "plan_fft_conv2d"
    )
    hw = (int(input_shape[-2]), int(input_shape[-1]))
    k = (int(weight_shape[2]), int(weight_shape[3]))
    c_in, c_out = int(input_shape[-3]), int(weight_shape[0])
    return _plan_cached(hw, k, st, dil, pads, circ, groups, c_in, c_out, bool(fold_stride))  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# pruned DFT matrices
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=512)
def _taps(n: int, rows: int, k: int, d: int, pl: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``E[r, u] = exp(+2 pi i r (u d - pl) / n)``, shape ``(rows, k)``, complex ``dtype``.

    Phases use exact integer arithmetic mod ``n`` before the float64 exponential.
    """
    r = torch.arange(rows, dtype=torch.int64)
    off = (torch.arange(k, dtype=torch.int64) * d - pl) % n
    phase = (r[:, None] * off[None, :]) % n
    ang = phase.to(torch.float64) * (2 * math.pi / n)
    return torch.polar(torch.ones_like(ang), ang).to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=512)
def _taps_adjoint_last(
    n: int, k: int, d: int, pl: int, n0: int, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """``V[v, r] = c_r E[r, v] / (n0 n)``, shape ``(k, n//2+1)``: half-spectrum inverse weights.

    ``c_r = 1`` for the DC (and Nyquist, for even ``n``) column, 2 for the others, so that
    ``Re(sum_r V[v, r] conj(Z[r]))`` is the real inverse DFT of a Hermitian spectrum ``Z`` at
    tap ``v`` (the weight gradient is assembled from the conjugate spectrum, see backward).
    """
    rows = n // 2 + 1
    e = _taps(n, rows, k, d, pl, torch.device("cpu"), torch.complex128)
    c = torch.full((rows,), 2.0, dtype=torch.float64)
    c[0] = 1.0
    if n % 2 == 0:
        c[-1] = 1.0
    v = (e * (c / (n0 * n))[:, None]).T.contiguous()
    return v.to(device=device, dtype=dtype)


def _complex_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


# --------------------------------------------------------------------------------------------
# kernel spectra
# --------------------------------------------------------------------------------------------
@dataclass
class KernelSpectrum:
    """A precomputed kernel spectrum for one :class:`FFTConvPlan` (no autograd history).

    ``data`` is the complex ``(N0, N1h, g, C_out/g, C_in/g)`` spectrum for channel-GEMM layers,
    or ``(C_out, N0, N1h)`` for elementwise (depthwise-like) layers (``N1h = N1 // 2 + 1``).
    """

    plan_key: tuple
    data: Tensor


def _kernel_spectrum_tensor(weight: Tensor, plan: FFTConvPlan) -> Tensor:
    a0, a1 = plan.axes
    n0, n1 = a0.grid, a1.grid
    n1h = n1 // 2 + 1
    cdt = _complex_dtype(weight.dtype)
    e0 = _taps(n0, n0, a0.k, a0.dilation, a0.pad_left, weight.device, cdt)  # (N0, kh)
    e1 = _taps(n1, n1h, a1.k, a1.dilation, a1.pad_left, weight.device, cdt)  # (N1h, kw)
    kh, kw = a0.k, a1.k
    g = plan.groups
    o = weight.shape[0]
    if plan.elementwise:
        w = weight.reshape(o, kh, kw).to(cdt)
        return torch.matmul(torch.matmul(e0, w), e1.T)  # (O, N0, N1h)
    cg, og = weight.shape[1], o // g
    rest = g * og * cg
    wt = weight.reshape(g, og, cg, kh, kw).permute(3, 4, 0, 1, 2).reshape(kh, kw * rest).to(cdt)
    a = torch.matmul(e0, wt).view(n0, kw, rest)  # (N0, kw, rest)
    return torch.matmul(e1, a).view(n0, n1h, g, og, cg)  # (N0, N1h, g, Og, Cg)


def kernel_spectrum(
    weight: Tensor,
    input_shape: Sequence[int],
    stride: _IntOrPair = 1,
    padding: str | _IntOrPair = 0,
    dilation: _IntOrPair = 1,
    groups: int = 1,
    padding_mode: PaddingMode = "zeros",
    *,
    fold_stride: bool = True,
) -> KernelSpectrum:
    """Precompute the kernel spectrum that :func:`fft_conv2d` (4-D ``weight``) or
    :func:`fft_conv1d` (3-D ``weight``) computes for inputs of ``input_shape``; no autograd.

    Pass the result as ``spectrum=`` to skip the kernel transform (the weight still receives its
    gradient). float16/bfloat16 weights give a float32 spectrum (the dtype the FFT runs in).
    ``fold_stride`` must be the value the convolution is called with (it sets the grid).
    """
    if weight.dim() == 3:  # 1-D: the height-1 2-D problem fft_conv1d solves
        stride, padding, dilation = _as_2d_args(stride, padding, dilation)
        weight = weight.unsqueeze(-2)
        input_shape = (*input_shape[:-1], 1, input_shape[-1])
    if weight.dtype in (torch.float16, torch.bfloat16):
        weight = weight.float()
    plan = plan_fft_conv2d(
        input_shape, weight.shape, stride, padding, dilation, groups, padding_mode, fold_stride=fold_stride
    )
    with torch.no_grad():
        return KernelSpectrum(plan.key, _kernel_spectrum_tensor(weight.detach(), plan))


# --------------------------------------------------------------------------------------------
# the pieces of forward and backward
# --------------------------------------------------------------------------------------------
def _positions(a: _Axis) -> list[int]:
    if a.out_index is not None:
        return list(a.out_index)
    assert a.out_slice is not None
    return list(range(*a.out_slice))


def _select(y: Tensor, a: _Axis, dim: int) -> Tensor:
    """The output positions of axis ``a`` along ``dim`` (a view unless they wrap around)."""
    if a.out_slice is not None:
        idx = [slice(None)] * y.dim()
        idx[dim] = slice(*a.out_slice)
        return y[tuple(idx)]
    return y.index_select(dim, torch.tensor(a.out_index, device=y.device))


def _place_output_grad(dy: Tensor, plan: FFTConvPlan) -> Tensor:
    """Real ``(B, O, M0, N1)`` grid holding ``dy`` at the output positions (adjoint of the crop)."""
    a0, a1 = plan.axes
    m0, n1 = a0.coarse, a1.grid
    b, o, ho, wo = dy.shape
    if a0.out_slice is not None and a1.out_slice is not None:
        sl0, sl1 = slice(*a0.out_slice), slice(*a1.out_slice)
        if sl0 == slice(0, ho, 1) and sl1 == slice(0, wo, 1):
            return dy  # rfft2(..., s=(M0, N1)) zero-pads
        buf = dy.new_zeros(b, o, m0, n1)
        buf[:, :, sl0, sl1] = dy
        return buf
    buf = dy.new_zeros(b, o, m0, n1)
    i0 = torch.tensor(_positions(a0), device=dy.device)
    i1 = torch.tensor(_positions(a1), device=dy.device)
    buf.permute(2, 3, 0, 1).index_put_((i0[:, None], i1[None, :]), dy.permute(2, 3, 0, 1), accumulate=True)
    return buf


def _input_spectrum(x: Tensor, plan: FFTConvPlan) -> Tensor:
    """``rfft2`` of the input on the grid: ``(B, C, N0, N1h)`` complex."""
    a0, a1 = plan.axes
    if a0.used < x.shape[-2] or a1.used < x.shape[-1]:
        x = x[..., : a0.used, : a1.used]
    return torch.fft.rfft2(x, s=(a0.grid, a1.grid))


def _to_freq_major(z: Tensor, g: int, conj: bool = False) -> Tensor:
    """``(B, g*c, N0, N1h)`` -> frequency-major ``(N0*N1h*g, B, c)`` (one copy; ``conj`` in the same pass)."""
    b, ch, n0, n1h = z.shape
    zp = z.view(b, g, ch // g, n0, n1h).permute(3, 4, 1, 0, 2)
    out = torch.empty(zp.shape, dtype=z.dtype, device=z.device)
    out.copy_(zp.conj() if conj else zp)
    return out.view(n0 * n1h * g, b, ch // g)


def _inverse_grid(
    z: Tensor, rows: _Axis | int, cols: _Axis | int, n0: int, n1: int, dims: tuple[int, int]
) -> Tensor:
    """Real inverse 2-D FFT of the half spectrum ``z`` along ``dims``, evaluated only on the rows
    (then columns) that are kept: an ``_Axis`` (its output positions) or an int (the first rows)."""
    d0, d1 = dims
    t = torch.fft.ifft(z, n=n0, dim=d0)
    t = _select(t, rows, d0) if isinstance(rows, _Axis) else t.narrow(d0, 0, rows)
    t = torch.fft.irfft(t, n=n1, dim=d1)
    return _select(t, cols, d1) if isinstance(cols, _Axis) else t.narrow(d1, 0, cols)


def _finish(y: Tensor, scale: float, bias: Tensor | None) -> Tensor:
    """Contiguous copy of the selected outputs ``y`` (any strides, ``(B, g, Og, Ho, Wo)``),
    times ``scale``, plus ``bias`` ``(g*Og,)``."""
    out = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    if scale != 1.0:
        torch.mul(y, scale, out=out)
    else:
        out.copy_(y)
    if bias is not None:
        out.add_(bias.view(1, y.shape[1], y.shape[2], 1, 1))
    return out


def _forward(
    x: Tensor, spec: Tensor, bias: Tensor | None, plan: FFTConvPlan, keep: bool
) -> tuple[Tensor, Tensor | None]:
    """Output ``(B, O, Ho, Wo)`` and (if ``keep``) the input spectrum the weight gradient needs."""
    a0, a1 = plan.axes
    s0, m0, n1 = a0.fold, a0.coarse, a1.grid
    n1h = n1 // 2 + 1
    b = x.shape[0]
    g, o = plan.groups, plan.c_out
    og = o // g
    ho, wo = plan.out_hw
    xf = _input_spectrum(x, plan)  # (B, C, N0, N1h)
    if plan.elementwise:
        yf = xf.view(b, g, 1, a0.grid, n1h) * spec.view(1, g, og, a0.grid, n1h)
        if s0 > 1:  # stride fold: sum the s0 aliases of every coarse frequency
            yf = yf.view(b, g, og, s0, m0, n1h).sum(3)
        yt = _inverse_grid(yf, a0, a1, m0, n1, (3, 4))  # (B, g, Og, Ho, Wo)
        return _finish(yt, 1.0 / s0, bias).view(b, o, ho, wo), (xf if keep else None)
    cg = plan.c_in // g
    xi = _to_freq_major(xf, g).view(s0, m0 * n1h * g, b, cg)
    del xf
    kt = spec.view(s0, m0 * n1h * g, og, cg).transpose(2, 3)  # (.., Cg, Og) views
    yc = torch.bmm(xi[0], kt[0])  # per frequency (B, Cg) @ (Cg, Og)
    for j in range(1, s0):  # stride fold: accumulate over the aliases
        yc.baddbmm_(xi[j], kt[j])
    yt = _inverse_grid(yc.view(m0, n1h, g, b, og), a0, a1, m0, n1, (0, 1))  # (Ho, Wo, g, B, Og)
    y = _finish(yt.permute(3, 2, 4, 0, 1), 1.0 / s0, bias)
    return y.view(b, o, ho, wo), (xi if keep else None)


def _crop_input_grad(gt: Tensor, plan: FFTConvPlan, x_shape: torch.Size) -> Tensor:
    """``(B, g, Cg, used0, used1)`` gradient on the input's footprint -> ``(B, C, H, W)``."""
    a0, a1 = plan.axes
    b, c, h, w = x_shape
    if a0.used == h and a1.used == w:
        out = torch.empty(gt.shape, dtype=gt.dtype, device=gt.device)
        out.copy_(gt)
        return out.view(b, c, h, w)
    out = gt.new_zeros(b, c, h, w)
    out.view(gt.shape[:3] + (h, w))[..., : a0.used, : a1.used] = gt
    return out


def _weight_grad(pbar: Tensor, plan: FFTConvPlan, weight_shape: torch.Size) -> Tensor:
    """Kernel taps of the weight gradient by a pruned inverse DFT of its conjugate spectrum.

    ``pbar[f] = sum_b X_b[f]^T conj(dY_b[f])`` (the conjugate of ``X^H dY``), layout
    ``(N0, N1h, g, Cg, Og)`` (GEMM path) or ``(O, N0, N1h)`` (elementwise path). Then
    ``dw[u, v] = Re(sum_f c_f E0[f0, u] E1[f1, v] pbar[f]) / (N0 N1)``.
    """
    a0, a1 = plan.axes
    n0, n1 = a0.grid, a1.grid
    cdt = pbar.dtype
    e0t = _taps(n0, n0, a0.k, a0.dilation, a0.pad_left, pbar.device, cdt).T  # (kh, N0)
    v = _taps_adjoint_last(n1, a1.k, a1.dilation, a1.pad_left, n0, pbar.device, cdt)  # (kw, N1h)
    kh, kw = a0.k, a1.k
    if plan.elementwise:
        q = torch.matmul(e0t, pbar)  # (O, kh, N1h)
        return torch.matmul(q, v.T).real.reshape(weight_shape)
    n1h, g, cg, og = pbar.shape[1:]
    rest = g * cg * og
    q = torch.matmul(e0t, pbar.reshape(n0, n1h * rest)).view(kh, n1h, rest)
    dw = torch.matmul(v, q).real  # (kh, kw, rest)
    return dw.view(kh, kw, g, cg, og).permute(2, 4, 3, 0, 1).reshape(weight_shape)


class _FFTConvFunction(torch.autograd.Function):
    """``y = conv(x, w) + b`` by FFT with Mathieu-style transform reuse in backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        plan: FFTConvPlan,
        spectrum: Tensor | None,
    ) -> Tensor:
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        spec = spectrum if spectrum is not None else _kernel_spectrum_tensor(weight, plan)
        y, xs = _forward(x, spec, bias, plan, keep=need_w)
        ctx.plan = plan
        ctx.x_shape = x.shape
        ctx.w_shape = weight.shape
        # the input spectrum serves the weight gradient, the kernel spectrum the input gradient
        ctx.save_for_backward(spec if need_x else None, xs)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        plan: FFTConvPlan = ctx.plan
        spec, xs = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = dw = db = None
        if need_b:
            db = dy.sum(dim=(0, 2, 3))
        if not (need_x or need_w):
            return dx, dw, db, None, None
        a0, a1 = plan.axes
        s0, m0, n0, n1 = a0.fold, a0.coarse, a0.grid, a1.grid
        n1h = n1 // 2 + 1
        b, c = ctx.x_shape[0], ctx.x_shape[1]
        g, o = plan.groups, plan.c_out
        og, cg = o // g, c // g
        # the output-gradient spectrum, computed once and used by both products; with a folded
        # stride it lives on the coarse grid and its fine spectrum is its periodic tiling
        df = torch.fft.rfft2(_place_output_grad(dy.contiguous(), plan), s=(m0, n1))  # (B, O, M0, N1h)
        if plan.elementwise:
            dv = df.view(b, g, og, 1, m0, n1h)  # broadcast over the s0 aliases = tiling
            if need_x:
                dxf = dv * spec.view(1, g, og, s0, m0, n1h).conj()  # dX = dY conj(K)
                dxf = dxf.sum(2) if og > 1 else dxf.squeeze(2)
                gt = _inverse_grid(dxf.reshape(b, g, 1, n0, n1h), a0.used, a1.used, n0, n1, (3, 4))
                dx = _crop_input_grad(gt, plan, ctx.x_shape)
            if need_w:
                pbar = (xs.view(b, g, 1, s0, m0, n1h) * dv.conj()).sum(0)  # sum_b X conj(dY)
                dw = _weight_grad(pbar.reshape(o, n0, n1h), plan, ctx.w_shape)
            return dx, dw, db, None, None
        dc = _to_freq_major(df, g, conj=True)  # conj(dY): (M0*N1h*g, B, Og)
        del df
        if need_x:
            k = spec.view(s0, m0 * n1h * g, og, cg)
            dxc = dc.new_empty(s0, m0 * n1h * g, b, cg)
            for j in range(s0):
                torch.bmm(dc, k[j], out=dxc[j])  # conj(dX) = conj(dY) K  (dX = dY K^H)
            gt = _inverse_grid(dxc.view(n0, n1h, g, b, cg).conj(), a0.used, a1.used, n0, n1, (0, 1))
            dx = _crop_input_grad(gt.permute(3, 2, 4, 0, 1), plan, ctx.x_shape)
        if need_w:
            pbar = dc.new_empty(s0, m0 * n1h * g, cg, og)
            for j in range(s0):
                torch.bmm(xs[j].transpose(1, 2), dc, out=pbar[j])  # conj(X^H dY), summed over the batch
            dw = _weight_grad(pbar.view(n0, n1h, g, cg, og), plan, ctx.w_shape)
        return dx, dw, db, None, None


# --------------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------------
def _autocast_on(input: Tensor) -> bool:
    dev = input.device.type
    return dev in ("cuda", "cpu", "xpu", "mps") and torch.is_autocast_enabled(dev)


def _compute_dtype(input: Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(dtype to compute in, dtype to return) following F.conv2d / autocast conventions.

    float64 stays float64 (autocast leaves it alone); in an autocast region the result has the
    autocast dtype (as ``F.conv2d`` there); half/bfloat16 inputs compute in float32 and return
    their own dtype.
    """
    dev = input.device.type
    if input.dtype == torch.float64:
        return torch.float64, torch.float64
    if _autocast_on(input):
        return torch.float32, torch.get_autocast_dtype(dev)
    if input.dtype in (torch.float16, torch.bfloat16):
        return torch.float32, input.dtype
    return input.dtype, input.dtype


def fft_conv2d(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: _IntOrPair = 1,
    padding: str | _IntOrPair = 0,
    dilation: _IntOrPair = 1,
    groups: int = 1,
    *,
    padding_mode: PaddingMode = "zeros",
    spectrum: KernelSpectrum | None = None,
    fold_stride: bool = True,
) -> Tensor:
    """2-D convolution (cross-correlation) by FFT with the semantics of ``F.conv2d``.

    Args:
        input: ``(B, C_in, H, W)`` or ``(C_in, H, W)``.
        weight: ``(C_out, C_in / groups, kh, kw)``.
        bias: ``(C_out,)`` or ``None``.
        stride, padding, dilation, groups: as ``F.conv2d`` (``padding`` may be an int, a pair,
            ``"same"`` or ``"valid"``).
        padding_mode: ``"zeros"`` (``F.conv2d``) or ``"circular"`` (what ``nn.Conv2d`` with
            ``padding_mode="circular"`` computes: periodic extension of the input).
        spectrum: a :func:`kernel_spectrum` of this weight for these shapes (skips the kernel
            transform; the weight still gets its gradient).
        fold_stride: fold the height stride into the frequency domain (default) instead of
            subsampling the inverse transform; both are exact (the benchmark compares them).

    Returns:
        ``(B, C_out, H_out, W_out)`` (or unbatched), contiguous, dtype as ``F.conv2d`` returns.

    Raises:
        ValueError / TypeError: on the arguments ``F.conv2d`` rejects (message names them).
    """
    st, pads, dil, circ = _check(
        input, weight, bias, stride, padding, dilation, groups, padding_mode, 2, "fft_conv2d"
    )
    unbatched = input.dim() == 3
    if unbatched:
        input = input.unsqueeze(0)
    compute, result = _compute_dtype(input)
    plan = _plan_cached(
        (int(input.shape[2]), int(input.shape[3])),
        (int(weight.shape[2]), int(weight.shape[3])),
        st,  # type: ignore[arg-type]
        dil,  # type: ignore[arg-type]
        pads,  # type: ignore[arg-type]
        circ,
        groups,
        int(input.shape[1]),
        int(weight.shape[0]),
        bool(fold_stride),
    )
    spec = None
    if spectrum is not None:
        if spectrum.plan_key != plan.key:
            raise ValueError(
                "fft_conv2d: `spectrum` was computed for other shapes or arguments than this call"
            )
        spec = spectrum.data
        if spec.dtype not in (compute, _complex_dtype(compute)) or spec.device != input.device:
            raise ValueError(
                f"fft_conv2d: `spectrum` has dtype {spec.dtype} on {spec.device}; expected {compute} on {input.device}"
            )
    if input.shape[0] == 0:
        out = input.new_zeros((0, plan.c_out, *plan.out_hw), dtype=result)
        return out.squeeze(0) if unbatched else out
    x, w, b = input, weight, bias
    if compute != input.dtype or result != input.dtype or _autocast_on(input):
        x, w = input.to(compute), weight.to(compute)
        b = bias.to(compute) if bias is not None else None
        with torch.autocast(input.device.type, enabled=False):
            y = _apply(x, w, b, plan, spec)
        y = y.to(result)
    else:
        y = _apply(x, w, b, plan, spec)
    return y.squeeze(0) if unbatched else y


def _apply(x: Tensor, w: Tensor, b: Tensor | None, plan: FFTConvPlan, spec: Tensor | None) -> Tensor:
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)
    )
    if needs_grad:
        return _FFTConvFunction.apply(x, w, b, plan, spec)
    with torch.no_grad():
        s = spec if spec is not None else _kernel_spectrum_tensor(w, plan)
        return _forward(x, s, b, plan, keep=False)[0]


def fft_conv1d(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: _IntOrPair = 1,
    padding: str | _IntOrPair = 0,
    dilation: _IntOrPair = 1,
    groups: int = 1,
    *,
    padding_mode: PaddingMode = "zeros",
    spectrum: KernelSpectrum | None = None,
) -> Tensor:
    """1-D convolution by FFT with the semantics of ``F.conv1d``.

    Input ``(B, C_in, L)`` or ``(C_in, L)``, weight ``(C_out, C_in / groups, k)``. Runs the 2-D
    implementation on a height-1 grid. ``spectrum`` must come from :func:`kernel_spectrum` with
    the unsqueezed (height-1) shapes.
    """
    _check(input, weight, bias, stride, padding, dilation, groups, padding_mode, 1, "fft_conv1d")
    st2, pad2, dil2 = _as_2d_args(stride, padding, dilation)
    y = fft_conv2d(
        input.unsqueeze(-2),
        weight.unsqueeze(-2),
        bias,
        st2,
        pad2,
        dil2,
        groups,
        padding_mode=padding_mode,
        spectrum=spectrum,
    )
    return y.squeeze(-2)


def _as_2d_args(
    stride: _IntOrPair, padding: str | _IntOrPair, dilation: _IntOrPair
) -> tuple[tuple[int, int], str | tuple[int, int], tuple[int, int]]:
    """1-D conv arguments as those of the equivalent height-1 2-D convolution."""
    st = _tuple(stride, 1, "stride", minimum=1)
    dil = _tuple(dilation, 1, "dilation", minimum=1)
    pad2: str | tuple[int, int] = (
        padding if isinstance(padding, str) else (0, _tuple(padding, 1, "padding", minimum=0)[0])
    )
    return (1, st[0]), pad2, (1, dil[0])
