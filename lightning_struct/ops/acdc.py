"""ACDC structured linear maps (Moczulski et al. 2016) as pure tensor functions.

One factor acts on a vector ``x`` of length ``N`` (``C`` = orthonormal DCT-II, :mod:`.dct`)::

    y = C^T (d * (C (a * x + a_bias)) + d_bias)          # IDCT(d * DCT(a * x + a_b) + d_b)

i.e. the affine map ``x -> C^T diag(d) C diag(a) x + C^T (d * C a_bias + d_bias)``: ``2N``
parameters (``4N`` with the two biases) and ``O(N log N)`` work. A stack of ``K`` factors
interleaves an optional ReLU and fixed permutations ``P_k`` *between* factors::

    x_1 = x,   y_k = F_k(x_k),   x_{k+1} = act(y_k)[..., perm_k],   output y_K

(no activation or permutation after the last factor).

:func:`acdc_stack` evaluates the whole stack in one ``torch.autograd.Function`` that works in
the *packed DCT domain* of :mod:`.dct`: after Makhoul's reordering ``G`` (done once at the
input and undone once at the output; the permutations are conjugated, ``G P_k G^-1``, and
fused with it into a single gather per factor), a factor is::

    h = a[G] * v + a_bias[G]                  # v: the reordered input
    p = rfft(h) * s exp(-i theta)             # packed DCT: p_k = X[k] - i X[N-k]
    q = p (*) (d[k], d[N-k]) + (db[k], -db[N-k])   # diagonal in the DCT domain, on (Re, Im)
    v' = irfft(q * exp(+i theta) / s)         # reordered output

so a factor costs one ``rfft`` and one ``irfft`` forward and one of each backward, plus a few
elementwise passes. The backward pass uses the structure instead of autograd through the FFTs:
with ``gY = C g_y`` (packed: ``rfft`` of the incoming gradient), ``g_d = sum_b gY * X``,
``g_db = sum_b gY``, ``g_h = C^T (d * gY)``, ``g_a = sum_b g_h * x``, ``g_ab = sum_b g_h`` and
``g_x = a * g_h``. It saves two tensors per factor (the factor's reordered input and its
packed spectrum ``p``). Double backward is not supported by the fast path;
:func:`acdc_stack_reference` (autograd through :func:`~.dct.dct`) is the slow, obviously
correct version used by the tests.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_struct.ops.dct import dct, dct_to_packed, idct, makhoul_index, packed_twiddles

__all__ = [
    "acdc_dense_matrix",
    "acdc_stack",
    "acdc_stack_reference",
    "check_acdc_args",
    "prepare_permutations",
]


def check_acdc_args(
    x: Tensor,
    a: Tensor,
    d: Tensor,
    a_bias: Tensor | None,
    d_bias: Tensor | None,
    permutations: Tensor | None,
) -> None:
    """Validate the shapes of :func:`acdc_stack` arguments (raises ``ValueError``/``TypeError``)."""
    if a.ndim != 2 or d.shape != a.shape:
        raise ValueError(
            f"acdc_stack: a and d must both have shape (K, N); got {tuple(a.shape)} and {tuple(d.shape)}"
        )
    k, n = a.shape
    if x.shape[-1] != n:
        raise ValueError(f"acdc_stack: input last dim {x.shape[-1]} does not match the factor size N={n}")
    for name, b in (("a_bias", a_bias), ("d_bias", d_bias)):
        if b is not None and b.shape != a.shape:
            raise ValueError(f"acdc_stack: {name} must have shape {tuple(a.shape)}, got {tuple(b.shape)}")
    if (a_bias is None) != (d_bias is None):
        raise ValueError("acdc_stack: give both a_bias and d_bias or neither")
    if permutations is not None:
        if permutations.dtype != torch.int64:
            raise TypeError(f"acdc_stack: permutations must be int64, got {permutations.dtype}")
        if permutations.shape != (k - 1, n):
            raise ValueError(
                f"acdc_stack: permutations must have shape (K-1, N) = {(k - 1, n)}, got {tuple(permutations.shape)}"
            )


def _packed_diag(v: Tensor) -> Tensor:
    """``(K, N)`` diagonal -> ``(K, N//2+1, 2)`` multipliers for the (Re, Im) slots: (v[k], v[N-k])."""
    p = dct_to_packed(v)  # (v[k], -v[N-k]) with 0 at k=0
    out = torch.view_as_real(p).clone()
    out[..., 1].neg_()
    return out


def _assemble(slots: Tensor, n: int, *, negate_imag: bool) -> Tensor:
    """Inverse of the slot layout for gradients: Re slots give indices 0..N//2, Im slots N-k."""
    tail = slots[..., 1 : (n + 1) // 2, 1].flip(-1)
    return torch.cat([slots[..., 0], tail.neg() if negate_imag else tail], dim=-1)


class _ACDCStackFunction(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        a: Tensor,
        d: Tensor,
        a_bias: Tensor | None,
        d_bias: Tensor | None,
        fused_perm: Tensor | None,
        fused_perm_inv: Tensor | None,
        relu: bool,
    ) -> Tensor:
        bsz, n = x.shape
        k_total = a.shape[0]
        device = x.device
        order, inverse = makhoul_index(n, device)
        fwd, inv = packed_twiddles(n, x.dtype, device)
        a_g = a.index_select(1, order)
        ab_g = a_bias.index_select(1, order) if a_bias is not None else None
        dp = _packed_diag(d)
        bp = torch.view_as_real(dct_to_packed(d_bias)) if d_bias is not None else None

        # elementwise temporaries live in two workspaces reused by every factor (the FFTs
        # allocate their outputs: their ``out=`` variants only add a copy)
        ws_h = torch.empty_like(x)
        ws_q = x.new_empty(bsz, n // 2 + 1, 2)
        v = torch.gather(x, 1, order.expand(bsz, n))
        inputs: list[Tensor] = []
        spectra: list[Tensor] = []
        out = x
        for k in range(k_total):
            inputs.append(v)
            if ab_g is not None:
                torch.addcmul(ab_g[k], v, a_g[k], out=ws_h)
            else:
                torch.mul(v, a_g[k], out=ws_h)
            p = torch.fft.rfft(ws_h, dim=-1).mul_(fwd)
            spectra.append(p)
            pr = torch.view_as_real(p)
            if bp is not None:
                torch.addcmul(bp[k], pr, dp[k], out=ws_q)
            else:
                torch.mul(pr, dp[k], out=ws_q)
            ws_y = torch.fft.irfft(torch.view_as_complex(ws_q).mul_(inv), n=n, dim=-1)
            if k < k_total - 1:
                if relu:
                    ws_y.relu_()
                v = torch.gather(ws_y, 1, fused_perm[k].expand(bsz, n)) if fused_perm is not None else ws_y
            else:
                out = torch.gather(ws_y, 1, inverse.expand(bsz, n))
        ctx.save_for_backward(a_g, dp, fused_perm_inv, *inputs, *spectra)
        ctx.k_total = k_total
        ctx.has_bias = a_bias is not None
        ctx.relu = relu
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        k_total: int = ctx.k_total
        a_g, dp, fused_perm_inv, *rest = ctx.saved_tensors
        inputs, spectra = rest[:k_total], rest[k_total:]
        bsz, n = inputs[0].shape
        device = grad_out.device
        order, inverse = makhoul_index(n, device)
        fwd, inv = packed_twiddles(n, inputs[0].dtype, device)
        grad_out = grad_out.to(inputs[0].dtype)

        g_a = torch.empty_like(a_g)
        g_d_slots = torch.empty_like(dp)
        g_ab = torch.empty_like(a_g) if ctx.has_bias else None
        g_db_slots = torch.empty_like(dp) if ctx.has_bias else None

        # workspaces reused by every factor (see forward)
        ws_r = torch.view_as_real(spectra[0]).new_empty(torch.view_as_real(spectra[0]).shape)
        ws_t = torch.empty_like(inputs[0])
        g = torch.gather(grad_out, 1, order.expand(bsz, n))  # gradient of y_K, reordered
        g_x = None
        for k in range(k_total - 1, -1, -1):
            pgr = torch.view_as_real(torch.fft.rfft(g, dim=-1).mul_(fwd))  # packed C g
            torch.sum(torch.mul(pgr, torch.view_as_real(spectra[k]), out=ws_r), dim=0, out=g_d_slots[k])
            if g_db_slots is not None:
                torch.sum(pgr, dim=0, out=g_db_slots[k])
            torch.mul(pgr, dp[k], out=ws_r)
            ws_gh = torch.fft.irfft(torch.view_as_complex(ws_r).mul_(inv), n=n, dim=-1)  # C^T (d * C g)
            torch.sum(torch.mul(ws_gh, inputs[k], out=ws_t), dim=0, out=g_a[k])
            if g_ab is not None:
                torch.sum(ws_gh, dim=0, out=g_ab[k])
            if k == 0 and not ctx.needs_input_grad[0]:
                break
            gh = ws_gh.mul_(a_g[k])  # gradient of this factor's (reordered) input
            if k > 0:
                if ctx.relu:  # gh * (input > 0) in one pass
                    gh = torch.ops.aten.threshold_backward.grad_input(gh, inputs[k], 0, grad_input=ws_t)
                if fused_perm_inv is not None:
                    g = torch.gather(gh, 1, fused_perm_inv[k - 1].expand(bsz, n), out=g)
                else:
                    g = gh  # read by the next rfft before the workspaces are overwritten
            else:
                g_x = torch.gather(gh, 1, inverse.expand(bsz, n))

        grad_a = g_a.index_select(1, inverse) if ctx.needs_input_grad[1] else None
        grad_d = _assemble(g_d_slots, n, negate_imag=False) if ctx.needs_input_grad[2] else None
        grad_ab = g_ab.index_select(1, inverse) if g_ab is not None and ctx.needs_input_grad[3] else None
        grad_db = (
            _assemble(g_db_slots, n, negate_imag=True)
            if g_db_slots is not None and ctx.needs_input_grad[4]
            else None
        )
        return g_x, grad_a, grad_d, grad_ab, grad_db, None, None, None


def prepare_permutations(permutations: Tensor) -> tuple[Tensor, Tensor]:
    """Fuse each between-factor permutation with Makhoul's reordering (done once, reusable).

    Args:
        permutations: int64 ``(K-1, N)``, ``x_{k+1} = act(y_k)[..., permutations[k]]``.

    Returns:
        ``(fused, fused_inverse)``, int64 ``(K-1, N)``: ``fused[k] = G^-1[permutations[k][G]]``
        (``G`` = :func:`~.dct.makhoul_index` order), the gather index in the reordered domain,
        and its inverse permutation (used by the backward pass).
    """
    if permutations.ndim != 2 or permutations.dtype != torch.int64:
        raise ValueError(
            f"prepare_permutations: expected int64 (K-1, N), got {permutations.dtype} {tuple(permutations.shape)}"
        )
    n = permutations.shape[1]
    order, inverse = makhoul_index(n, permutations.device)
    fused = inverse[permutations[:, order]].contiguous()
    fused_inv = torch.empty_like(fused)
    fused_inv.scatter_(1, fused, torch.arange(n, device=fused.device).expand_as(fused))
    return fused, fused_inv


def acdc_stack(
    x: Tensor,
    a: Tensor,
    d: Tensor,
    a_bias: Tensor | None = None,
    d_bias: Tensor | None = None,
    permutations: Tensor | None = None,
    relu: bool = False,
    *,
    prepared: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Apply ``K`` ACDC factors with optional ReLU and permutations between them (fast path).

    Args:
        x: input ``(..., N)``.
        a, d: diagonals ``(K, N)``; factor ``k`` uses row ``k``.
        a_bias, d_bias: biases ``(K, N)`` or both ``None``.
        permutations: int64 ``(K-1, N)``; between factor ``k`` and ``k+1`` the activation is
            re-indexed ``x_{k+1} = act(y_k)[..., permutations[k]]``. ``None``: no permutation.
        relu: apply ReLU between factors (never after the last).
        prepared: ``prepare_permutations(permutations)``, to skip recomputing it every call.

    Returns:
        ``(..., N)`` in the dtype of ``a`` (float16/bfloat16 parameters are computed in float32).
        Supports first-order autograd for every tensor argument except ``permutations``.
    """
    check_acdc_args(x, a, d, a_bias, d_bias, permutations)
    n = a.shape[1]
    lead = x.shape[:-1]
    dtype = torch.float32 if a.dtype in (torch.float16, torch.bfloat16) else a.dtype
    cast = [t.to(dtype) if t is not None else None for t in (a, d, a_bias, d_bias)]
    x2 = x.reshape(-1, n).to(dtype)
    if x2.shape[0] == 0:
        return x.new_zeros(x.shape, dtype=dtype)
    fused, fused_inv = (None, None)
    if permutations is not None and permutations.shape[0] > 0:
        if prepared is not None:
            fused, fused_inv = prepared
        else:
            fused, fused_inv = prepare_permutations(permutations.to(x.device))
    with torch.autocast(x2.device.type, enabled=False):  # the FFT path runs in float32/64
        out = _ACDCStackFunction.apply(x2.contiguous(), *cast, fused, fused_inv, bool(relu))
    return out.reshape(*lead, n)


def acdc_stack_reference(
    x: Tensor,
    a: Tensor,
    d: Tensor,
    a_bias: Tensor | None = None,
    d_bias: Tensor | None = None,
    permutations: Tensor | None = None,
    relu: bool = False,
) -> Tensor:
    """Same as :func:`acdc_stack`, written literally with :func:`~.dct.dct` / :func:`~.dct.idct`.

    Slow (one autograd graph node per elementary op) but obviously correct; supports higher
    order gradients. Used by tests and as the baseline the fast path is measured against.
    """
    check_acdc_args(x, a, d, a_bias, d_bias, permutations)
    k_total = a.shape[0]
    for k in range(k_total):
        h = x * a[k] + a_bias[k] if a_bias is not None else x * a[k]
        y = dct(h) * d[k]
        if d_bias is not None:
            y = y + d_bias[k]
        x = idct(y)
        if k < k_total - 1:
            if relu:
                x = torch.relu(x)
            if permutations is not None:
                x = x[..., permutations[k]]
    return x


@torch.no_grad()
def acdc_dense_matrix(
    a: Tensor,
    d: Tensor,
    a_bias: Tensor | None = None,
    d_bias: Tensor | None = None,
    permutations: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The affine map of a ReLU-free stack as a dense matrix and bias (column convention).

    Returns:
        ``(M, b)`` with ``M`` of shape ``(N, N)`` and ``b`` of shape ``(N,)`` such that
        ``acdc_stack(x, ..., relu=False) == x @ M.T + b``. Computed by pushing the identity
        through the fast path (``O(N^2 log N)``), biases handled separately so that ``M`` is exact.
    """
    n = a.shape[1]
    eye = torch.eye(n, dtype=a.dtype, device=a.device)
    m = acdc_stack(eye, a, d, None, None, permutations, relu=False).T.contiguous()
    if a_bias is None or d_bias is None:
        return m, torch.zeros(n, dtype=a.dtype, device=a.device)
    zero = torch.zeros(1, n, dtype=a.dtype, device=a.device)
    b = acdc_stack(zero, a, d, a_bias, d_bias, permutations, relu=False)[0]
    return m, b
