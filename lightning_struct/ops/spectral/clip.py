"""Operator-norm clipping of convolution kernels (Sedghi, Gupta & Long 2019)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lightning_struct._checks import check_int, check_number
from lightning_struct.ops.spectral._pool import cpu_single_threaded
from lightning_struct.ops.spectral.eigen import _svd
from lightning_struct.ops.spectral.geometry import _complex, _compute_dtype, _geometry, _half_indices
from lightning_struct.ops.spectral.symbols import _SymbolBuilder

__all__ = ["clip_conv_operator_norm"]


@cpu_single_threaded
def clip_conv_operator_norm(
    weight: torch.Tensor,
    input_size: int | Sequence[int],
    max_norm: float,
    *,
    stride: int | Sequence[int] = 1,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    n_iter: int = 1,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Kernel whose periodic operator norm is (approximately) at most ``max_norm``.

    Sedghi et al. (2019), generalised to stride / dilation / groups through the block symbol:
    per coarse frequency ``B = U diag(sigma) V^H`` becomes ``U diag(min(sigma, max_norm)) V^H``;
    the clipped block symbol is unpacked to the fine-grid symbol, transformed back to a full
    ``n``-periodic kernel and **restricted to the original support** (the ``k`` dilated tap
    positions). The restriction can raise the norm again, so the two projections alternate
    ``n_iter`` times (converging towards the intersection of both sets). Deterministic (same
    result on every DDP rank).

    Args:
        weight: ``(C_out, C_in/groups, *kernel)`` real.
        input_size, stride, dilation, groups: as in :func:`conv_spectrum`; the dilated kernel
            extent must not exceed ``input_size`` (its taps would alias).
        max_norm: the bound (> 0).
        n_iter: alternating projections (>= 1).
        dtype: compute dtype (default float32, float64 for float64 weights).

    Returns:
        A new tensor of the shape, dtype and device of ``weight``.
    """
    geom = _geometry(weight, input_size, stride, dilation, groups)
    check_number(max_norm, "max_norm", minimum=0, maximum=math.inf, open_min=True, open_max=True)
    check_int(n_iter, "n_iter", minimum=1)
    for i in range(geom.d):
        extent = (geom.k[i] - 1) * geom.dil[i] + 1
        if extent > geom.n[i]:
            raise ValueError(
                f"clip_conv_operator_norm: the dilated kernel extent {extent} along dim {i} exceeds "
                f"input_size[{i}]={geom.n[i]}; its taps alias and the support cannot be restored"
            )
    rdt = _compute_dtype(weight, dtype)
    cdt = _complex(rdt)
    d, S = geom.d, geom.S
    w = weight.detach().to(rdt)
    idx_full = _half_indices(geom, weight.device, half=False)
    pos = [torch.arange(geom.k[i], device=weight.device) * geom.dil[i] for i in range(d)]
    for _ in range(n_iter):
        wg = w.reshape(geom.g, geom.co, geom.ci, *geom.k)
        B = _SymbolBuilder(wg, geom.n, geom.s, idx_full[1:], pos, cdt, S**-0.5)(
            idx_full[0]
        )  # (F, G, co, S ci)
        U, sv, Vh = _svd(B)
        if bool((sv <= max_norm).all()):
            break
        Bc = (U * sv.clamp(max=max_norm).to(cdt)[..., None, :]) @ Vh
        # unpack: B columns (a_1..a_d, c) -> A on the fine grid: A(theta_a) = sqrt(S) B[..., a, :]
        A = Bc.reshape(*geom.m, geom.g, geom.co, *geom.s, geom.ci) * math.sqrt(S)
        # axes: m_1..m_d, G, co, s_1..s_d, ci -> fine axis i = a_i * m_i + J_i
        perm = []
        for i in range(d):
            perm += [d + 2 + i, i]  # (s_i, m_i) so that the flattened index is a*m + J
        A = A.permute(*perm, d, d + 1, 2 * d + 2).reshape(*geom.n, geom.g, geom.co, geom.ci)
        # A(j) = sum_p K[p] exp(+2 pi i j p / n)  =>  K = fftn(A) / N over the spatial axes
        Kfull = torch.fft.fftn(A, dim=tuple(range(d))).real / math.prod(geom.n)
        # restrict to the support: positions u * dil
        sub = Kfull
        for i in range(d):
            sub = sub.index_select(i, pos[i])
        # sub: (k_1..k_d, G, co, ci) -> (G*co, ci, k_1..k_d)
        w = sub.permute(d, d + 1, d + 2, *range(d)).reshape(geom.g * geom.co, geom.ci, *geom.k)
    return w.to(weight.dtype)
