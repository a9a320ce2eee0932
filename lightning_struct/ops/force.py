"""Force regularization (Wen et al., ICCV 2017) and filter-rank metrics, as pure tensor math.

A weight tensor holds ``N`` filters ``W_i = weight[i].flatten()`` of length ``D``
(conv ``C_out x C_in/groups x k x k`` -> ``N = C_out``, ``D = C_in/groups * k * k``; linear
``out x in`` -> ``N = out``, ``D = in``). With unit filters ``n_i = W_i / ||W_i||`` the two
pairwise energies of the paper are

* L2 ("Degradation" in the authors' Caffe code):  ``E_L2 = 1/2 sum_{i<j} ||n_i - n_j||^2``
* L1 ("Constant"):                                 ``E_L1 = sum_{i<j} ||n_i - n_j||``

``dE/dn_i = T_i`` with ``T_i = sum_j (n_i - n_j) / c(d_ij)`` (``c = 1`` for L2, ``c = d`` for L1),
and ``dE/dW_i = T_i_perp / ||W_i||`` where ``T_i_perp = T_i - (n_i . T_i) n_i`` is the part
tangential to the unit sphere. The authors' solver adds ``||W_i|| * T_i_perp`` instead
(``scale="authors"``, equal to ``||W_i||^2 dE/dW_i``: same direction per filter, a step that
grows with the filter norm); ``scale="gradient"`` gives the exact ``dE/dW_i``.

Both are computed in closed form, batched over groups, with no loop over filters:

* L2: ``T_i_perp = -(s - (n_i . s) n_i)`` with ``s = sum_j n_j``: two matrix-vector products,
  ``O(N D)``.
* L1: with the cosine matrix ``C = Nn Nn^T`` (one matmul), ``d_ij = sqrt(max(0, 2 - 2 C_ij))``,
  ``R_ij = 1/d_ij`` (0 on the diagonal, for coincident pairs and for zero filters),
  ``T_i_perp = -(M_i - (n_i . M_i) n_i)`` with ``M = R Nn``. The whole force is then
  ``P W`` with the ``N x N`` matrix ``P = diag(a) R diag(1/||W||) + diag(b)``: a second matmul,
  ``O(N^2 D)`` in all.

Guards (never a NaN): a filter with ``||W_i|| <= eps_norm`` (the authors' ``ZERO_THRESHOLD``,
1e-4) neither feels nor exerts a force; for L1 a pair closer than ``eps_dist`` (default 1e-4 in
float64, 1e-3 in lower precision, where ``2 - 2 C_ij`` is dominated by rounding) exerts none.

Grouped convolutions: filters interact only inside their group (``groups`` argument), as in
the authors' AlexNet, which they split into independent per-group layers.

Rank metric: the smallest ``r`` such that the ``r`` largest squared singular values of the
``N x D`` filter matrix hold a fraction ``energy`` of their sum (the authors' PCA rule with
``--rankratio``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from lightning_struct._checks import check_choice, check_int, check_number
from lightning_struct.ops.linalg import symmetric_gram

ForceKind = Literal["l2", "l1"]
ForceScale = Literal["authors", "gradient"]

KINDS: tuple[str, ...] = ("l2", "l1")
SCALES: tuple[str, ...] = ("authors", "gradient")

#: the authors' ``ZERO_THRESHOLD``: filters with a smaller norm are left out
EPS_NORM: float = 1e-4

__all__ = [
    "EPS_NORM",
    "KINDS",
    "SCALES",
    "add_force_",
    "filter_matrix",
    "filter_rank",
    "filter_ranks",
    "force_energy",
    "force_gradient",
    "max_filter_rank",
    "mean_pairwise_cosine",
    "weights_overflow_safe",
]


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _check(weight: Tensor, groups: int, what: str = "weight") -> None:
    if not isinstance(weight, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() < 2:
        raise ValueError(
            f"{what} must have at least 2 dims (filters x ...), got shape {tuple(weight.shape)}; "
            "biases and norm-layer parameters are not regularized"
        )
    check_int(groups, "groups", minimum=1)
    if weight.shape[0] % groups != 0:
        raise ValueError(f"{what} has {weight.shape[0]} filters, not divisible by groups={groups}")


def _check_kind_scale(kind: str, scale: str) -> None:
    check_choice(kind, "kind", KINDS)
    check_choice(scale, "scale", SCALES)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half / bfloat16 weights are processed in float32."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _default_eps_dist(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float64 else 1e-3


def filter_matrix(weight: Tensor, groups: int = 1) -> Tensor:
    """View ``weight`` as per-group filter matrices.

    Args:
        weight: ``(N, ...)`` with ``N`` divisible by ``groups``.
        groups: number of independent filter groups (``conv.groups``).

    Returns:
        ``(groups, N / groups, D)`` in the compute dtype (float32 for half/bfloat16), a view
        when possible.
    """
    _check(weight, groups)
    n = weight.shape[0]
    w = weight.detach().reshape(groups, n // groups, -1)
    ct = _compute_dtype(w.dtype)
    return w if w.dtype == ct else w.to(ct)


def _norms(w: Tensor, eps_norm: float, r: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Filter norms ``r`` (G, Ng), validity mask (float) and ``1/r`` (0 for invalid filters)."""
    r = torch.linalg.vector_norm(w, dim=-1) if r is None else r
    valid = (r > eps_norm).to(w.dtype)
    inv_r = valid / torch.where(valid > 0, r, torch.ones_like(r))
    return r * valid, valid, inv_r


def _l2_terms(w: Tensor, inv_r: Tensor) -> tuple[Tensor, Tensor]:
    """``s_g = sum_j n_j`` per group ``(G, 1, D)`` and ``n_i . s`` ``(G, Ng)``."""
    s = torch.bmm(inv_r.unsqueeze(1), w)  # (G, 1, D)
    n_dot_s = torch.bmm(w, s.transpose(1, 2)).squeeze(-1) * inv_r  # (G, Ng)
    return s, n_dot_s


#: filters per group from which the Gram is formed by block rows of its upper triangle
GRAM_BLOCKS_FROM: int = 256
_GRAM_BLOCKS = 4


def _cosines(w: Tensor, inv_r: Tensor) -> Tensor:
    """Cosine matrix ``C_ij = n_i . n_j`` (G, Ng, Ng); rows/columns of invalid filters are 0."""
    N = w.shape[1]
    edges = [round(i * N / _GRAM_BLOCKS) for i in range(_GRAM_BLOCKS + 1)] if N >= GRAM_BLOCKS_FROM else None
    c = symmetric_gram(w, edges)
    return c.mul_(inv_r.unsqueeze(-1)).mul_(inv_r.unsqueeze(-2))


def _l1_inverse_distances(c: Tensor, valid: Tensor, eps_dist: float) -> Tensor:
    """``R_ij = 1 / ||n_i - n_j||`` (G, Ng, Ng), 0 on the diagonal, for coincident pairs
    (distance <= eps_dist) and for pairs involving an invalid (zero) filter."""
    d = (2.0 - 2.0 * c).clamp_(min=0.0).sqrt_()
    d.masked_fill_(d <= eps_dist, math.inf)
    d.diagonal(dim1=-2, dim2=-1).fill_(math.inf)
    rinv = d.reciprocal_()
    return rinv.mul_(valid.unsqueeze(-1)).mul_(valid.unsqueeze(-2))


def _coefficients(r: Tensor, inv_r: Tensor, n_dot_m: Tensor, scale: str) -> tuple[Tensor, Tensor]:
    """Per-filter ``a, b`` with ``force_i = a_i M_i + b_i W_i``."""
    if scale == "authors":  # ||W_i|| T_perp = -||W_i|| M_i + (n_i . M_i) W_i
        return -r, n_dot_m
    # T_perp / ||W_i|| = -M_i / ||W_i|| + (n_i . M_i) W_i / ||W_i||^2
    return -inv_r, n_dot_m * inv_r * inv_r


def _l1_matrix(
    w: Tensor, scale: str, r: Tensor, valid: Tensor, inv_r: Tensor, eps_dist: float | None
) -> Tensor:
    """The ``(G, Ng, Ng)`` matrix ``P`` with force ``= P @ W`` (per group) for the L1 force."""
    eps_d = _default_eps_dist(w.dtype) if eps_dist is None else eps_dist
    c = _cosines(w, inv_r)
    rinv = _l1_inverse_distances(c, valid, eps_d)
    n_dot_m = (rinv * c).sum(-1)  # n_i . M_i = sum_j R_ij C_ij
    a, b = _coefficients(r, inv_r, n_dot_m, scale)
    p = rinv.mul_(a.unsqueeze(-1)).mul_(inv_r.unsqueeze(-2))  # diag(a) R diag(1/r)
    p.diagonal(dim1=-2, dim2=-1).add_(b)
    return p


def _validate_eps(eps_norm: float, eps_dist: float | None) -> None:
    # maximum=inf, open: finite
    check_number(eps_norm, "eps_norm", minimum=0, maximum=math.inf, open_max=True)
    check_number(eps_dist, "eps_dist", minimum=0, maximum=math.inf, open_max=True, optional=True)


# ----------------------------------------------------------------------------------------------
# force
# ----------------------------------------------------------------------------------------------
class _Parts(NamedTuple):
    """The force on the filter matrix ``w`` (G, Ng, D) is ``factor * (a s + b w)`` (L2; ``a, b``
    are (G, Ng, 1), ``s`` is (G, 1, D)) or ``factor * (p @ w)`` (L1; ``p`` is (G, Ng, Ng))."""

    w: Tensor
    factor: float
    a: Tensor | None = None
    b: Tensor | None = None
    s: Tensor | None = None
    p: Tensor | None = None


def _norm_limit(dtype: torch.dtype) -> float:
    """Filter norms below this keep squared norms and Gram entries finite in ``dtype``."""
    return math.sqrt(torch.finfo(_compute_dtype(dtype)).max) / 4.0


def weights_overflow_safe(weights: Sequence[Tensor]) -> bool:
    """True when no filter norm of any of ``weights`` can overflow (``max|W| sqrt(D)`` below the
    limit of its compute dtype): callers may then pass ``check_overflow=False`` to
    :func:`add_force_` and save its per-call host sync. One reduction per tensor, one host sync
    in all (useful on GPUs)."""
    if not weights:
        return True
    scaled = [
        torch.linalg.vector_norm(w.detach(), ord=math.inf).float()
        * (math.sqrt(max(w[0].numel(), 1)) / _norm_limit(w.dtype))
        for w in weights
        if w.numel()
    ]
    return bool(torch.stack(scaled).max() < 1.0) if scaled else True


def _safe_filters(w: Tensor, eps_norm: float, check: bool = True) -> tuple[Tensor, float, Tensor, float]:
    """``(w', eps_norm', r', m)`` with ``w' = w / m``, ``r'`` its filter norms (G, Ng).

    ``m = 1`` unless squared norms / Gram entries would overflow the dtype (filters near
    ``sqrt(dtype max)``); then ``m = max |w|``. One host sync on the ``N`` norms (skipped with
    ``check=False``); the rescaling branch is never taken for weights a network can use.
    """
    r = torch.linalg.vector_norm(w, dim=-1)
    if check and r.numel() and not float(r.max()) < _norm_limit(w.dtype):
        m = float(torch.linalg.vector_norm(w, ord=math.inf))
        if math.isfinite(m) and m > 0:
            w = w / m
            return w, eps_norm / m, torch.linalg.vector_norm(w, dim=-1), m
    return w, eps_norm, r, 1.0


def _force_parts(
    w: Tensor, kind: str, scale: str, eps_norm: float, eps_dist: float | None, check: bool = True
) -> _Parts:
    # the authors' force is 1-homogeneous in W, the exact gradient (-1)-homogeneous
    w, eps_norm, r, m = _safe_filters(w, eps_norm, check)
    factor = m if scale == "authors" else 1.0 / m
    r, valid, inv_r = _norms(w, eps_norm, r)
    if kind == "l2":
        s, n_dot_s = _l2_terms(w, inv_r)
        a, b = _coefficients(r, inv_r, n_dot_s, scale)
        return _Parts(w, factor, a=a.unsqueeze(-1), b=b.unsqueeze(-1), s=s)
    return _Parts(w, factor, p=_l1_matrix(w, scale, r, valid, inv_r, eps_dist))


def force_gradient(
    weight: Tensor,
    kind: ForceKind = "l2",
    scale: ForceScale = "authors",
    groups: int = 1,
    *,
    eps_norm: float = EPS_NORM,
    eps_dist: float | None = None,
) -> Tensor:
    """The force term added to ``weight.grad`` (before multiplying by the strength).

    Args:
        weight: ``(N, ...)`` weight tensor (conv ``C_out x C_in/groups x k...``, linear
            ``out x in``); any float dtype (half/bfloat16 are processed in float32).
        kind: ``"l2"`` (the authors' "Degradation", ``O(N D)``) or ``"l1"`` ("Constant",
            ``O(N^2 D)``, one Gram matmul plus one more matmul).
        scale: ``"authors"`` (``||W_i|| * T_i_perp``, the Caffe solver; ``= ||W_i||^2 dE/dW_i``)
            or ``"gradient"`` (the exact ``dE/dW_i = T_i_perp / ||W_i||``).
        groups: filters interact only inside each of ``groups`` consecutive blocks of filters.
        eps_norm: filters with norm ``<= eps_norm`` neither feel nor exert a force.
        eps_dist: L1 only: pairs of unit filters closer than this exert no force (default 1e-4
            in float64, 1e-3 otherwise).

    Returns:
        Tensor shaped and typed like ``weight`` (no autograd history); units of ``weight``
        (``"authors"``) or of ``1 / weight`` (``"gradient"``).
    """
    _check(weight, groups)
    _check_kind_scale(kind, scale)
    _validate_eps(eps_norm, eps_dist)
    with torch.no_grad():
        parts = _force_parts(filter_matrix(weight, groups), kind, scale, eps_norm, eps_dist)
        if parts.p is not None:
            out = torch.bmm(parts.p, parts.w)
        else:
            out = torch.baddbmm(parts.w * parts.b, parts.a, parts.s)
        if parts.factor != 1.0:
            out.mul_(parts.factor)
        return out.reshape(weight.shape).to(weight.dtype)


def add_force_(
    grad: Tensor,
    weight: Tensor,
    alpha: float,
    kind: ForceKind = "l2",
    scale: ForceScale = "authors",
    groups: int = 1,
    *,
    eps_norm: float = EPS_NORM,
    eps_dist: float | None = None,
    check_overflow: bool = True,
) -> Tensor:
    """In place ``grad += alpha * force_gradient(weight, ...)``.

    With a contiguous ``grad`` in the compute dtype there is no ``N x D`` temporary: L2 is one
    rank-1 update plus one fused multiply-add over ``grad``, L1 one ``baddbmm``.

    Args:
        grad: gradient tensor shaped like ``weight``; modified in place and returned.
        weight: ``(N, ...)`` weight tensor.
        alpha: strength ``lambda`` (a plain float).
        kind, scale, groups, eps_norm, eps_dist: as in :func:`force_gradient`.
        check_overflow: guard against filter norms whose squares overflow (one host sync per
            call); pass ``False`` only when :func:`weights_overflow_safe` said so.

    Returns:
        ``grad``.
    """
    _check(weight, groups)
    _check_kind_scale(kind, scale)
    _validate_eps(eps_norm, eps_dist)
    if grad.shape != weight.shape:
        raise ValueError(f"grad shape {tuple(grad.shape)} differs from weight shape {tuple(weight.shape)}")
    alpha = float(alpha)
    if alpha == 0.0:
        return grad
    with torch.no_grad():
        w = filter_matrix(weight, groups)
        if not (grad.is_contiguous() and grad.dtype == w.dtype):
            return grad.add_(
                force_gradient(weight, kind, scale, groups, eps_norm=eps_norm, eps_dist=eps_dist), alpha=alpha
            )
        parts = _force_parts(w, kind, scale, eps_norm, eps_dist, check_overflow)
        g = grad.view(parts.w.shape)
        alpha = alpha * parts.factor
        if parts.p is not None:
            g.baddbmm_(parts.p, parts.w, alpha=alpha)
        else:
            g.baddbmm_(parts.a, parts.s, alpha=alpha)
            g.addcmul_(parts.w, parts.b, value=alpha)
    return grad


def force_energy(
    weight: Tensor,
    kind: ForceKind = "l2",
    groups: int = 1,
    *,
    eps_norm: float = EPS_NORM,
) -> Tensor:
    """The pairwise energy whose gradient the force is (summed over groups).

    ``E_L2 = 1/2 sum_{i<j} ||n_i - n_j||^2 = (N^2 - ||sum_i n_i||^2) / 2`` per group and
    ``E_L1 = sum_{i<j} ||n_i - n_j||``; filters with norm ``<= eps_norm`` are left out.

    Args:
        weight: ``(N, ...)`` weight tensor.
        kind: ``"l2"`` or ``"l1"``.
        groups: independent filter groups.
        eps_norm: zero-filter threshold.

    Returns:
        0-dim tensor (compute dtype), no autograd history. Dimensionless.
    """
    _check(weight, groups)
    _check_kind_scale(kind, "authors")
    _validate_eps(eps_norm, None)
    with torch.no_grad():
        w, eps_norm, r, _ = _safe_filters(filter_matrix(weight, groups), eps_norm)  # E is scale-free
        _, valid, inv_r = _norms(w, eps_norm, r)
        if kind == "l2":
            s = torch.bmm(inv_r.unsqueeze(1), w).squeeze(1)
            nv = valid.sum(-1)
            return (0.5 * (nv * nv - (s * s).sum(-1))).clamp_(min=0).sum()
        c = _cosines(w, inv_r)
        d = (2.0 - 2.0 * c).clamp_(min=0.0).sqrt_()
        d.diagonal(dim1=-2, dim2=-1).zero_()
        d.mul_(valid.unsqueeze(-1)).mul_(valid.unsqueeze(-2))
        return 0.5 * d.sum()


# ----------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------
def _check_energy(energy: float) -> float:
    return check_number(energy, "energy", minimum=0, open_min=True, maximum=1)  # type: ignore[return-value]


def _squared_singular_values(weight: Tensor, groups: int) -> Tensor:
    """Descending squared singular values ``(G, min(Ng, D))`` of each group's filter matrix:
    eigenvalues of the smaller Gram matrix, in float64 for float64 weights and float32
    otherwise (the energy fractions are then accurate to about 1e-6, plenty for a rank rule)."""
    w = filter_matrix(weight, groups)
    ng, dd = w.shape[1], w.shape[2]
    gram = torch.bmm(w, w.transpose(1, 2)) if ng <= dd else torch.bmm(w.transpose(1, 2), w)
    ev = torch.linalg.eigvalsh(gram).clamp_(min=0.0)  # ascending
    return ev.flip(-1)


def filter_ranks(weight: Tensor, energies: Sequence[float] = (0.95,), groups: int = 1) -> list[int]:
    """Filter ranks at several energy fractions from one eigen-decomposition.

    For each group the rank is the smallest ``r`` with
    ``sum_{k<=r} sigma_k^2 >= energy * sum_k sigma_k^2`` for the ``N/groups x D`` filter matrix
    (0 for an all-zero matrix); the returned value sums the groups.

    Args:
        weight: ``(N, ...)`` weight tensor.
        energies: fractions in ``(0, 1]``.
        groups: independent filter groups.

    Returns:
        One int per energy.
    """
    _check(weight, groups)
    es = [_check_energy(e) for e in energies]
    if not es:
        raise ValueError("energies must not be empty")
    with torch.no_grad():
        s2 = _squared_singular_values(weight, groups)  # (G, K) descending
        total = s2.sum(-1, keepdim=True)
        frac = s2.cumsum(-1) / torch.where(total > 0, total, torch.ones_like(total))
        k = s2.shape[-1]
        e = torch.tensor(es, dtype=s2.dtype, device=s2.device)
        tol = 1e-12 if s2.dtype == torch.float64 else 1e-6
        # number of leading values whose cumulative fraction is still short of the target, + 1
        short = (frac.unsqueeze(1) < (e - tol).view(1, -1, 1)).sum(-1)  # (G, E)
        ranks = torch.clamp(short + 1, max=k)
        ranks = torch.where(total > 0, ranks, torch.zeros_like(ranks))
        return [int(v) for v in ranks.sum(0).tolist()]


def filter_rank(weight: Tensor, energy: float = 0.95, groups: int = 1) -> int:
    """Smallest ``r`` keeping a fraction ``energy`` of the squared singular values of the
    ``N x D`` filter matrix (summed over groups). See :func:`filter_ranks`.

    Args:
        weight: ``(N, ...)`` weight tensor.
        energy: fraction in ``(0, 1]`` (default 0.95, the authors' ``--rankratio``).
        groups: independent filter groups.
    """
    return filter_ranks(weight, (energy,), groups)[0]


def max_filter_rank(weight: Tensor, groups: int = 1) -> int:
    """Full rank of the filter matrices: ``groups * min(N / groups, D)``."""
    _check(weight, groups)
    ng = weight.shape[0] // groups
    d = weight[0].numel()
    return groups * min(ng, d)


def mean_pairwise_cosine(weight: Tensor, groups: int = 1, *, eps_norm: float = EPS_NORM) -> float:
    """Mean of ``n_i . n_j`` over pairs ``i < j`` of non-zero filters in the same group.

    ``O(N D)``: per group ``sum_{i<j} n_i . n_j = (||s||^2 - N) / 2``. Returns 0.0 when there is
    no pair (fewer than two non-zero filters per group).

    Args:
        weight: ``(N, ...)`` weight tensor.
        groups: independent filter groups.
        eps_norm: zero-filter threshold.
    """
    _check(weight, groups)
    _validate_eps(eps_norm, None)
    with torch.no_grad():
        w = filter_matrix(weight, groups).to(torch.float64)
        _, valid, inv_r = _norms(w, eps_norm)
        s = torch.bmm(inv_r.unsqueeze(1), w).squeeze(1)
        nv = valid.sum(-1)
        pair_sum = 0.5 * ((s * s).sum(-1) - nv)
        pairs = 0.5 * nv * (nv - 1)
        total_pairs = float(pairs.sum())
        if total_pairs <= 0:
            return 0.0
        return float(pair_sum.sum()) / total_pairs
