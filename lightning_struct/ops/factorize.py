"""Low-rank factorizations of conv kernels and linear weights, and rank-selection rules.

Pure tensor math: every function takes weight tensors and returns factor tensors (or ints);
nothing here owns ``nn.Module`` state. Notation: a conv kernel ``w`` has shape
``(N, C/g, kh, kw)`` (``N`` output channels, ``C`` input channels, ``g`` groups,
``Ng = N/g``, ``Cg = C/g``). Grouped convs are factorized *per group* with the same rank in
every group (all groups go through one batched SVD), so the factor layers are grouped convs
with the same ``g``.

Schemes (``ALGORITHMS.md`` sections 1.3 and 6):

* ``"channel"`` (Zhang et al. 2016, data-free form): ``w`` viewed as ``Ng x (Cg kh kw)`` per
  group, ``w ~ P Q``: a ``kh x kw`` conv to ``r`` channels (``Q``, original stride / padding /
  dilation) followed by a ``1 x 1`` conv ``r -> N`` (``P``, takes the bias).
* ``"spatial"`` (Jaderberg et al. 2014 scheme 2, closed form of Tai et al. 2016): per group
  ``M[(c, i), (j, n)] = w[n, c, i, j]`` of shape ``(Cg kh) x (kw Ng)``; a vertical ``kh x 1``
  conv to ``K`` channels then a horizontal ``1 x kw`` conv ``K -> N`` (takes the bias).
* ``"tucker2"`` (Kim et al. 2016, HOSVD): ``1 x 1`` conv ``C -> R_in``, core ``kh x kw`` conv
  ``R_in -> R_out`` (original geometry), ``1 x 1`` conv ``R_out -> N`` (takes the bias).
* Linear ``"svd"``: ``W (out x in) ~ (U sqrt(S)) (sqrt(S) V^T)``.

The singular values are split as ``sqrt(S)`` between the two factors of the matrix schemes
(balanced factors train better than ``U S`` / ``V^T``). SVDs run in float64 and the factors are
cast back to the weight's dtype, so a full-rank factorization reproduces the layer to float32
rounding.

Costs are counted per example: parameters (weights plus bias), and FLOPs as multiply-accumulates
of the conv/linear products (the fvcore convention; ratios do not depend on the convention).

Rank rules: :func:`energy_rank` (smallest rank keeping a fraction of the *squared* singular
values - Wen et al.'s PCA route), :func:`ratio_rank` (a fraction of the full rank), an absolute
rank (clipped to the full rank), and :func:`allocate_budget` (greedy allocation of a global
parameter / FLOP budget across layers, maximising ``sum_l log(retained energy_l)`` as in Zhang
et al. 2016).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from lightning_struct._checks import check_choice, check_int, check_number

ConvScheme = Literal["channel", "spatial", "tucker2"]
CONV_SCHEMES: tuple[str, ...] = ("channel", "spatial", "tucker2")
CostKind = Literal["params", "flops"]
Pair = tuple[int, int]
Padding = str | Pair

__all__ = [
    "CONV_SCHEMES",
    "allocate_budget",
    "as_pair",
    "check_scheme",
    "channel_factors",
    "compose_channel",
    "compose_linear",
    "compose_spatial",
    "compose_tucker2",
    "conv_factor_flops",
    "conv_factor_params",
    "conv_full_rank",
    "conv_matrix",
    "conv_out_hw",
    "conv_spectrum",
    "dense_conv_flops",
    "dense_conv_params",
    "dense_linear_flops",
    "dense_linear_params",
    "energy_rank",
    "linear_factor_flops",
    "linear_factor_params",
    "linear_factors",
    "ratio_rank",
    "retained_energy",
    "singular_values",
    "spatial_factors",
    "svd_split",
    "tucker2_factors",
]


# ----------------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------------
def check_scheme(scheme: str) -> str:
    """Return ``scheme`` if it is a conv scheme, else raise ``ValueError`` listing the allowed ones."""
    return check_choice(scheme, "scheme", CONV_SCHEMES)


def _conv_dims(w: Tensor, groups: int) -> tuple[int, int, int, int, int]:
    """``(g, Ng, Cg, kh, kw)`` of a conv kernel, validating shape and groups."""
    if w.dim() != 4:
        raise ValueError(f"conv weight must have shape (N, C/groups, kh, kw); got {tuple(w.shape)}")
    check_int(groups, "groups", minimum=1)
    n, cg, kh, kw = w.shape
    if n % groups:
        raise ValueError(f"out_channels={n} is not divisible by groups={groups}")
    return groups, n // groups, cg, kh, kw


def _check_rank(rank: int, what: str = "rank") -> int:
    check_int(rank, what, minimum=1)
    return rank


def as_pair(
    value: int | Sequence[int] | str, name: str, where: str = "", *, strings: Sequence[str] = ()
) -> Pair | str:
    """``value`` as an ``(a, b)`` pair of ints: an int ``a`` gives ``(a, a)``, a length-2 sequence
    of ints passes; a string is returned unchanged if it is one of ``strings`` (e.g. ``"same"``,
    ``"valid"`` for a padding).

    Raises:
        ValueError: anything else (the message names ``where``, ``name``, the value and what is
            allowed).
    """
    prefix = f"{where}: " if where else ""
    if isinstance(value, str):
        if value in strings:
            return value
        allowed = " or one of " + ", ".join(map(repr, strings)) if strings else ""
        raise ValueError(f"{prefix}{name}={value!r} must be an int or a pair of ints{allowed}")
    items = tuple(value) if isinstance(value, Sequence) else (value, value)
    if len(items) == 2 and not any(isinstance(x, bool) for x in items):
        try:
            return (operator.index(items[0]), operator.index(items[1]))
        except TypeError:
            pass
    raise ValueError(f"{prefix}{name}={value!r} must be an int or a pair of ints")


# ----------------------------------------------------------------------------------------------
# matrix views and spectra
# ----------------------------------------------------------------------------------------------
def conv_matrix(w: Tensor, scheme: str, groups: int = 1) -> Tensor:
    """The per-group matrix whose SVD defines a matrix scheme.

    Args:
        w: conv kernel ``(N, Cg, kh, kw)``.
        scheme: ``"channel"`` -> ``(g, Ng, Cg kh kw)``; ``"spatial"`` -> ``(g, Cg kh, kw Ng)``
            with ``M[(c, i), (j, n)] = w[n, c, i, j]``.
        groups: conv groups ``g``.

    Returns:
        ``(g, rows, cols)`` tensor (a view or copy of ``w``).
    """
    g, ng, cg, kh, kw = _conv_dims(w, groups)
    if scheme == "channel":
        return w.reshape(g, ng, cg * kh * kw)
    if scheme == "spatial":
        return w.reshape(g, ng, cg, kh, kw).permute(0, 2, 3, 4, 1).reshape(g, cg * kh, kw * ng)
    if scheme == "tucker2":
        raise ValueError("scheme='tucker2' has two unfoldings, not one matrix: use conv_spectrum")
    check_scheme(scheme)
    raise AssertionError  # pragma: no cover


def _unfold_in(w: Tensor, groups: int) -> Tensor:
    """Mode-2 (input-channel) unfolding per group: ``(g, Cg, Ng kh kw)``."""
    g, ng, cg, kh, kw = _conv_dims(w, groups)
    return w.reshape(g, ng, cg, kh * kw).permute(0, 2, 1, 3).reshape(g, cg, ng * kh * kw)


def conv_full_rank(w_shape: Sequence[int], scheme: str, groups: int = 1) -> int | Pair:
    """Largest useful rank of a scheme: ``min(rows, cols)`` (a pair ``(R_in, R_out)`` for Tucker-2)."""
    n, cg, kh, kw = (int(s) for s in w_shape)
    ng = n // groups
    if scheme == "channel":
        return min(ng, cg * kh * kw)
    if scheme == "spatial":
        return min(cg * kh, kw * ng)
    if scheme == "tucker2":
        return (min(cg, ng * kh * kw), min(ng, cg * kh * kw))
    check_scheme(scheme)
    raise AssertionError  # pragma: no cover


def singular_values(m: Tensor) -> Tensor:
    """Singular values of ``(..., rows, cols)`` in float64, descending.

    Computed as ``sqrt`` of the eigenvalues of the smaller Gram matrix ``M M^T`` / ``M^T M``
    (one GEMM and a symmetric eigensolve, several times cheaper than ``svdvals`` for the wide
    matrices of conv layers). The squared values - what every rank rule uses - come out with an
    absolute error of about ``1e-16 * s_1^2``; tiny singular values lose relative accuracy,
    which no energy fraction can notice.
    """
    m64 = m.detach().to(torch.float64)
    gram = m64 @ m64.mT if m64.shape[-2] <= m64.shape[-1] else m64.mT @ m64
    lam = torch.linalg.eigvalsh(gram).flip(-1).clamp_min(0.0)
    return lam.sqrt()


def conv_spectrum(w: Tensor, scheme: str, groups: int = 1) -> Tensor | tuple[Tensor, Tensor]:
    """Singular values (float64, descending, per group) that the rank rules act on.

    Returns:
        ``(g, m)`` for ``"channel"``/``"spatial"``; for ``"tucker2"`` a pair
        ``(s_in (g, m_in), s_out (g, m_out))`` of the input-channel and output-channel unfoldings.
    """
    if scheme == "tucker2":
        s_out = singular_values(conv_matrix(w, "channel", groups))
        s_in = singular_values(_unfold_in(w, groups))
        return s_in, s_out
    return singular_values(conv_matrix(w, scheme, groups))


# ----------------------------------------------------------------------------------------------
# factorizations
# ----------------------------------------------------------------------------------------------
def _left_basis(m64: Tensor) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition of ``M M^T``: ``(lam (..., rows) descending, U (..., rows, rows))``."""
    lam, u = torch.linalg.eigh(m64 @ m64.mT)
    return lam.flip(-1).clamp_min(0.0), u.flip(-1)


def svd_split(m: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Best rank-``rank`` factors of a (batched) matrix, singular values split as ``sqrt(S)``.

    Computed from the symmetric eigen-decomposition of the smaller Gram matrix (``M M^T`` or
    ``M^T M``, float64): with ``U_r`` its leading orthonormal eigenvectors, ``U_r U_r^T M`` *is*
    the truncated SVD, and the factors are ``a = U_r S_r^{1/2}``, ``b = S_r^{-1/2} U_r^T M`` (or
    the mirror image for tall matrices). This is exact to float64 rounding at full rank (``U``
    is orthonormal) and an order of magnitude faster than LAPACK's SVD for the wide matrices of
    conv layers.

    Args:
        m: ``(..., rows, cols)``.
        rank: kept rank, clipped to ``min(rows, cols)``.

    Returns:
        ``a (..., rows, r)`` and ``b (..., r, cols)`` with ``a @ b`` the truncated SVD of ``m``
        (Eckart-Young optimal in Frobenius and spectral norm), in ``m``'s dtype.
    """
    _check_rank(rank)
    m64 = m.detach().to(torch.float64)
    wide = m64.shape[-2] <= m64.shape[-1]
    lam, basis = _left_basis(m64 if wide else m64.mT)
    r = min(rank, lam.shape[-1])
    ur = basis[..., :r]
    root = lam[..., :r].sqrt().sqrt()  # sqrt(s) = lam^(1/4)
    safe = torch.where(root > 0, root, torch.ones_like(root))  # a_i b_i = U_i U_i^T M whatever safe_i is
    if wide:
        a = ur * safe.unsqueeze(-2)
        b = (ur.mT @ m64) / safe.unsqueeze(-1)
    else:
        b = (ur * safe.unsqueeze(-2)).mT
        a = (m64 @ ur) / safe.unsqueeze(-2)
    return a.to(m.dtype), b.to(m.dtype)


def linear_factors(w: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Linear SVD: ``w (out, in) ~ second @ first``.

    Returns:
        ``first (r, in)`` (the ``in -> r`` layer) and ``second (out, r)`` (the ``r -> out`` layer,
        which takes the bias).
    """
    if w.dim() != 2:
        raise ValueError(f"linear weight must have shape (out_features, in_features); got {tuple(w.shape)}")
    a, b = svd_split(w, rank)
    return b.contiguous(), a.contiguous()


def channel_factors(w: Tensor, rank: int, groups: int = 1) -> tuple[Tensor, Tensor]:
    """Channel decomposition of a conv kernel.

    Args:
        w: ``(N, Cg, kh, kw)``.
        rank: ``r`` per group (clipped to ``min(Ng, Cg kh kw)``).
        groups: conv groups ``g``.

    Returns:
        ``first (g r, Cg, kh, kw)`` (grouped ``kh x kw`` conv, original stride/padding/dilation)
        and ``second (N, r, 1, 1)`` (grouped ``1 x 1`` conv, takes the bias).
    """
    g, ng, cg, kh, kw = _conv_dims(w, groups)
    a, b = svd_split(conv_matrix(w, "channel", groups), rank)  # (g, Ng, r), (g, r, Cg kh kw)
    r = a.shape[-1]
    first = b.reshape(g * r, cg, kh, kw).contiguous()
    second = a.reshape(g * ng, r, 1, 1).contiguous()
    return first, second


def spatial_factors(w: Tensor, rank: int, groups: int = 1) -> tuple[Tensor, Tensor]:
    """Jaderberg scheme 2 (vertical then horizontal), closed form by SVD.

    Args:
        w: ``(N, Cg, kh, kw)``.
        rank: ``K`` per group (clipped to ``min(Cg kh, kw Ng)``).
        groups: conv groups ``g``.

    Returns:
        ``vertical (g K, Cg, kh, 1)`` (stride ``(s_h, 1)``, padding ``(p_h, 0)``, dilation
        ``(d_h, 1)``) and ``horizontal (N, K, 1, kw)`` (stride ``(1, s_w)``, padding ``(0, p_w)``,
        dilation ``(1, d_w)``, takes the bias); ``w[n, c, i, j] ~ sum_k H[n, k, 0, j] V[k, c, i, 0]``.
    """
    g, ng, cg, kh, kw = _conv_dims(w, groups)
    a, b = svd_split(conv_matrix(w, "spatial", groups), rank)  # (g, Cg kh, K), (g, K, kw Ng)
    k = a.shape[-1]
    vertical = a.permute(0, 2, 1).reshape(g * k, cg, kh, 1).contiguous()
    horizontal = b.reshape(g, k, kw, ng).permute(0, 3, 1, 2).reshape(g * ng, k, 1, kw).contiguous()
    return vertical, horizontal


def tucker2_factors(w: Tensor, ranks: int | Sequence[int], groups: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """Tucker-2 decomposition by (truncated) HOSVD.

    ``w ~ core x_1 U_out x_2 U_in`` per group, ``U_in`` the leading left singular vectors of the
    input-channel unfolding, ``U_out`` those of the output-channel unfolding, and
    ``core = w x_1 U_out^T x_2 U_in^T``.

    Args:
        w: ``(N, Cg, kh, kw)``.
        ranks: ``(R_in, R_out)`` per group, or one int for both (each clipped to its full rank).
        groups: conv groups ``g``.

    Returns:
        ``first (g R_in, Cg, 1, 1)``, ``core (g R_out, R_in, kh, kw)`` (original geometry) and
        ``last (N, R_out, 1, 1)`` (takes the bias); all three are grouped convs with ``g`` groups.
    """
    g, ng, cg, kh, kw = _conv_dims(w, groups)
    r_in, r_out = as_pair(ranks, "ranks")  # type: ignore[misc]
    _check_rank(r_in, "R_in")
    _check_rank(r_out, "R_out")
    w64 = w.detach().to(torch.float64)
    # leading left singular vectors of the unfoldings = leading eigenvectors of their Gram matrices
    u_out = _left_basis(conv_matrix(w64, "channel", groups))[1]
    u_in = _left_basis(_unfold_in(w64, groups))[1]
    u_out = u_out[..., : min(r_out, conv_full_rank(w.shape, "tucker2", groups)[1])]  # (g, Ng, R_out)
    u_in = u_in[..., : min(r_in, conv_full_rank(w.shape, "tucker2", groups)[0])]  # (g, Cg, R_in)
    ro, ri = u_out.shape[-1], u_in.shape[-1]
    core = torch.einsum("gnckl,gno,gci->goikl", w64.reshape(g, ng, cg, kh, kw), u_out, u_in)
    first = u_in.permute(0, 2, 1).reshape(g * ri, cg, 1, 1)
    last = u_out.reshape(g * ng, ro, 1, 1)
    dt = w.dtype
    return (
        first.to(dt).contiguous(),
        core.reshape(g * ro, ri, kh, kw).to(dt).contiguous(),
        last.to(dt).contiguous(),
    )


# ----------------------------------------------------------------------------------------------
# fold back (autograd-safe)
# ----------------------------------------------------------------------------------------------
def compose_linear(first: Tensor, second: Tensor) -> Tensor:
    """Dense ``(out, in)`` weight of ``second (out, r) @ first (r, in)``."""
    return second @ first


def compose_channel(first: Tensor, second: Tensor, groups: int = 1) -> Tensor:
    """Dense kernel ``(N, Cg, kh, kw)`` of a channel decomposition (inverse of :func:`channel_factors`)."""
    gr, cg, kh, kw = first.shape
    n, r = second.shape[:2]
    g = groups
    w = torch.bmm(second.reshape(g, n // g, r), first.reshape(g, gr // g, cg * kh * kw))
    return w.reshape(n, cg, kh, kw)


def compose_spatial(vertical: Tensor, horizontal: Tensor, groups: int = 1) -> Tensor:
    """Dense kernel ``(N, Cg, kh, kw)`` of a vertical/horizontal pair (inverse of :func:`spatial_factors`)."""
    gk, cg, kh, _ = vertical.shape
    n, k, _, kw = horizontal.shape
    g = groups
    v = vertical.reshape(g, gk // g, cg, kh)
    h = horizontal.reshape(g, n // g, k, kw)
    return torch.einsum("gkci,gnkj->gncij", v, h).reshape(n, cg, kh, kw)


def compose_tucker2(first: Tensor, core: Tensor, last: Tensor, groups: int = 1) -> Tensor:
    """Dense kernel ``(N, Cg, kh, kw)`` of a Tucker-2 triple (inverse of :func:`tucker2_factors`)."""
    g = groups
    gri, cg = first.shape[:2]
    gro, ri, kh, kw = core.shape
    n, ro = last.shape[:2]
    u_in = first.reshape(g, gri // g, cg)
    c = core.reshape(g, gro // g, ri, kh, kw)
    u_out = last.reshape(g, n // g, ro)
    return torch.einsum("gno,goikl,gic->gnckl", u_out, c, u_in).reshape(n, cg, kh, kw)


# ----------------------------------------------------------------------------------------------
# rank rules
# ----------------------------------------------------------------------------------------------
def retained_energy(s: Tensor) -> Tensor:
    """Fraction of ``sum s^2`` kept at each rank ``r = 1..m``.

    Args:
        s: singular values ``(m,)`` or per group ``(g, m)`` (the same rank in every group).

    Returns:
        float64 ``(m,)``, non-decreasing, last entry 1 (all ones for an all-zero spectrum).
    """
    s2 = s.detach().to(torch.float64).square()
    if s2.dim() == 2:
        cum = s2.cumsum(-1).sum(0)
    elif s2.dim() == 1:
        cum = s2.cumsum(-1)
    else:
        raise ValueError(f"singular values must have shape (m,) or (groups, m); got {tuple(s.shape)}")
    total = cum[-1]
    if total <= 0:
        return torch.ones_like(cum)
    return cum / total


def energy_rank(s: Tensor, energy: float) -> int:
    """Smallest rank keeping at least ``energy`` of the squared singular values.

    Args:
        s: singular values ``(m,)`` or ``(g, m)`` (rank shared by the groups).
        energy: fraction in ``(0, 1]``; ``1.0`` returns the full rank ``m``.
    """
    check_number(energy, "energy", minimum=0, open_min=True, maximum=1)  # of the squared singular values
    frac = retained_energy(s)
    m = frac.shape[0]
    if float(energy) >= 1.0:
        return m
    r = int((frac < float(energy) - 1e-12).sum().item()) + 1
    return min(r, m)


def ratio_rank(full_rank: int, ratio: float) -> int:
    """``ceil(ratio * full_rank)`` (at least 1): a fixed fraction of the full rank."""
    check_number(ratio, "ratio", minimum=0, open_min=True, maximum=1)  # of the full rank
    return max(1, min(full_rank, math.ceil(float(ratio) * full_rank - 1e-9)))


# ----------------------------------------------------------------------------------------------
# costs
# ----------------------------------------------------------------------------------------------
def conv_out_hw(
    in_hw: Sequence[int],
    kernel: Sequence[int],
    stride: Sequence[int] = (1, 1),
    padding: Padding = (0, 0),
    dilation: Sequence[int] = (1, 1),
) -> Pair:
    """Output ``(H', W')`` of a conv on an ``in_hw`` map (``padding`` may be ``"same"``/``"valid"``)."""
    h, w = (int(v) for v in in_hw)
    if padding == "same":
        return (h, w)
    pad = (0, 0) if padding == "valid" else as_pair(padding, "padding")
    out = []
    for n, k, s, p, d in zip((h, w), kernel, stride, pad, dilation):
        out.append((n + 2 * p - d * (k - 1) - 1) // s + 1)
    return (out[0], out[1])


def dense_conv_params(w_shape: Sequence[int], bias: bool = True) -> int:
    """Parameters of a dense conv with kernel shape ``(N, Cg, kh, kw)``."""
    n, cg, kh, kw = (int(s) for s in w_shape)
    return n * cg * kh * kw + (n if bias else 0)


def conv_factor_params(
    scheme: str, w_shape: Sequence[int], rank: int | Sequence[int], groups: int = 1, bias: bool = True
) -> int:
    """Parameters of the factorized conv (``rank`` per group; a pair for Tucker-2)."""
    n, cg, kh, kw = (int(s) for s in w_shape)
    g = groups
    b = n if bias else 0
    if scheme == "channel":
        r = int(rank)  # type: ignore[arg-type]
        return g * r * cg * kh * kw + n * r + b
    if scheme == "spatial":
        k = int(rank)  # type: ignore[arg-type]
        return g * k * cg * kh + n * k * kw + b
    if scheme == "tucker2":
        ri, ro = as_pair(rank, "rank")  # type: ignore[misc]
        return g * ri * cg + g * ro * ri * kh * kw + n * ro + b
    check_scheme(scheme)
    raise AssertionError  # pragma: no cover


def dense_conv_flops(w_shape: Sequence[int], out_hw: Sequence[int]) -> int:
    """Multiply-accumulates of a dense conv per example: ``N Cg kh kw H' W'``."""
    n, cg, kh, kw = (int(s) for s in w_shape)
    return n * cg * kh * kw * int(out_hw[0]) * int(out_hw[1])


def conv_factor_flops(
    scheme: str,
    w_shape: Sequence[int],
    rank: int | Sequence[int],
    in_hw: Sequence[int],
    groups: int = 1,
    stride: Sequence[int] = (1, 1),
    padding: Padding = (0, 0),
    dilation: Sequence[int] = (1, 1),
) -> int:
    """Multiply-accumulates per example of the factorized conv on an ``in_hw`` input map."""
    n, cg, kh, kw = (int(s) for s in w_shape)
    g = groups
    ho, wo = conv_out_hw(in_hw, (kh, kw), stride, padding, dilation)
    if scheme == "channel":
        r = int(rank)  # type: ignore[arg-type]
        return g * r * cg * kh * kw * ho * wo + n * r * ho * wo
    if scheme == "spatial":
        k = int(rank)  # type: ignore[arg-type]
        # the vertical conv keeps the input width (kernel width 1, stride 1, no column padding)
        if padding in ("same", "valid"):
            v_pad: Padding = padding
        else:
            v_pad = (as_pair(padding, "padding")[0], 0)  # type: ignore[assignment]
        hv, wv = conv_out_hw(in_hw, (kh, 1), (stride[0], 1), v_pad, (dilation[0], 1))
        return g * k * cg * kh * hv * wv + n * k * kw * ho * wo
    if scheme == "tucker2":
        ri, ro = as_pair(rank, "rank")  # type: ignore[misc]
        h, w = (int(v) for v in in_hw)
        return g * ri * cg * h * w + g * ro * ri * kh * kw * ho * wo + n * ro * ho * wo
    check_scheme(scheme)
    raise AssertionError  # pragma: no cover


def dense_linear_params(out_features: int, in_features: int, bias: bool = True) -> int:
    """Parameters of a dense ``nn.Linear``."""
    return out_features * in_features + (out_features if bias else 0)


def linear_factor_params(out_features: int, in_features: int, rank: int, bias: bool = True) -> int:
    """Parameters of ``Linear(in, r, bias=False)`` followed by ``Linear(r, out)``."""
    return rank * (in_features + out_features) + (out_features if bias else 0)


def dense_linear_flops(out_features: int, in_features: int, rows: int = 1) -> int:
    """Multiply-accumulates per example; ``rows`` = positions per example (e.g. tokens)."""
    return out_features * in_features * rows


def linear_factor_flops(out_features: int, in_features: int, rank: int, rows: int = 1) -> int:
    """Multiply-accumulates per example of the two-factor linear layer."""
    return rank * (in_features + out_features) * rows


# ----------------------------------------------------------------------------------------------
# global budget
# ----------------------------------------------------------------------------------------------
def allocate_budget(
    costs: Sequence[Tensor],
    values: Sequence[Tensor],
    budget: float,
    fixed_cost: float = 0.0,
) -> list[int]:
    """Greedy allocation of a global cost budget across layers.

    Each layer ``l`` offers options ``t = 0..T_l-1`` (e.g. rank ``t + 1``) with non-decreasing
    ``costs[l][t]`` and retained-energy fractions ``values[l][t]`` in ``(0, 1]``. Every layer
    starts at option 0; then increments are taken in decreasing order of
    ``delta log(value) / delta cost`` (Zhang et al. 2016 maximise the product of retained
    energies) while the total stays within ``budget``. Per layer the efficiencies are replaced by
    their running minimum, so a layer's increments are always taken in order; for the matrix
    schemes (cost linear in the rank, gains ``log(1 + s_{r+1}^2 / sum_{i<=r} s_i^2)``
    non-increasing) this is exactly the classic one-increment-at-a-time greedy, done with one sort.

    Args:
        costs: per layer a 1-d tensor of option costs (params or FLOPs).
        values: per layer a 1-d tensor of retained-energy fractions, same lengths as ``costs``.
        budget: total cost allowed (the options' costs plus ``fixed_cost``).
        fixed_cost: cost of everything that is not allocated (e.g. layers that stay dense).

    Returns:
        The chosen option index per layer.

    Raises:
        ValueError: lengths differ, or even option 0 everywhere exceeds ``budget`` (the message
            gives the smallest achievable total).
    """
    if len(costs) != len(values):
        raise ValueError(f"costs ({len(costs)} layers) and values ({len(values)} layers) differ in length")
    if not costs:
        return []
    c = [torch.as_tensor(x, dtype=torch.float64).reshape(-1) for x in costs]
    v = [torch.as_tensor(x, dtype=torch.float64).reshape(-1) for x in values]
    for i, (ci, vi) in enumerate(zip(c, v)):
        if ci.numel() == 0 or ci.numel() != vi.numel():
            raise ValueError(f"layer {i}: costs and values must be non-empty and of equal length")
    base = float(fixed_cost) + float(sum(ci[0] for ci in c))
    if base > budget:
        raise ValueError(
            f"budget={budget:.6g} is below the smallest achievable cost {base:.6g} "
            f"(every factorized layer at rank 1 plus the layers kept dense)"
        )
    effs, dcs, owners = [], [], []
    for i, (ci, vi) in enumerate(zip(c, v)):
        if ci.numel() < 2:
            continue
        dc = (ci[1:] - ci[:-1]).clamp_min(1e-12)
        dv = vi.clamp_min(1e-300).log().diff()
        eff = torch.cummin(dv / dc, dim=0).values
        effs.append(eff)
        dcs.append(dc)
        owners.append(torch.full_like(dc, i, dtype=torch.long))
    chosen = [0] * len(c)
    if not effs:
        return chosen
    eff_all = torch.cat(effs)
    dc_all = torch.cat(dcs)
    own_all = torch.cat(owners)
    order = torch.sort(-eff_all, stable=True).indices
    total = base + torch.cumsum(dc_all[order], 0)
    fits = total <= budget + 1e-9 * max(1.0, abs(budget))
    n_take = int(fits.long().cumprod(0).sum().item())  # the longest fitting prefix
    counts = torch.bincount(own_all[order[:n_take]], minlength=len(c))
    return [int(x) for x in counts.tolist()]
