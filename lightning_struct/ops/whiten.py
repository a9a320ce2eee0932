"""Output-aware (data-aware) truncated SVD: the rank-r factors that minimize a layer's *output* error.

For a layer ``y = W x`` (``W``: ``N x d``) seen on calibration inputs ``X`` (``n x d``, one row per
input vector; for a conv, one row per unfolded ``C kh kw`` patch), the rank-``r`` map minimizing
``||X (W - W_r)^T||_F`` is, with the input covariance ``X^T X = S S^T`` (Cholesky)::

    W S = U diag(s) V^T,    W_r = U_r diag(s_r) V_r^T S^-1

(SVD-LLM's truncation-aware whitening, in closed form): the error of rank ``r`` is
``sqrt(sum_{i>r} s_i^2)``, so the whitened singular values ``s`` play the role the weight's own
singular values play for the weight objective (energy rules, budgets). Factors: ``first =
diag(s_r) V_r^T S^-1`` (``r x d``, the ``d -> r`` layer) and ``second = U_r`` (``N x r``).

Numerics: the covariance is accumulated and factorized in float64 with a ridge ``eps * tr(C)/d``
(so a rank-deficient calibration stays solvable; ``eps = 1e-6`` barely changes a full-rank one).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["input_covariance", "output_aware_factors", "patch_rows", "whitened_spectrum", "whitening"]


def patch_rows(
    x: Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> Tensor:
    """The conv's input patches as rows ``(B * L, C * kh * kw)`` (``F.unfold`` order = the weight's ``reshape(N, -1)``)."""
    cols = F.unfold(x, tuple(kernel_size), dilation=tuple(dilation), padding=tuple(padding), stride=tuple(stride))
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def input_covariance(rows: Iterable[Tensor], dim: int) -> tuple[Tensor, int]:
    """``sum X_i^T X_i`` in float64 over row blocks ``X_i`` (``(n_i, dim)``), and the number of rows."""
    cov = None
    n = 0
    for x in rows:
        x64 = x.reshape(-1, dim).to(torch.float64)
        cov = x64.T @ x64 if cov is None else cov.addmm_(x64.T, x64)
        n += x64.shape[0]
    if cov is None:
        raise ValueError("input_covariance: no calibration rows")
    return cov, n


def whitening(cov: Tensor, eps: float = 1e-6) -> Tensor:
    """Lower-triangular ``S`` with ``S S^T = cov + eps * tr(cov)/d * I`` (float64)."""
    d = cov.shape[0]
    ridge = eps * float(torch.trace(cov)) / d
    if ridge <= 0:
        ridge = eps
    eye = torch.eye(d, dtype=torch.float64, device=cov.device)
    for k in range(6):  # a few retries with a larger ridge for a numerically singular covariance
        chol, info = torch.linalg.cholesky_ex(cov + (ridge * 10**k) * eye)
        if int(info) == 0:
            return chol
    raise ValueError("whitening: the calibration covariance is not positive definite even with a ridge")


def whitened_spectrum(w2d: Tensor, s: Tensor) -> Tensor:
    """Singular values of ``W S`` (the output-error spectrum), descending, float64."""
    return torch.linalg.svdvals(w2d.to(torch.float64) @ s)


def output_aware_factors(w2d: Tensor, s: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``first (r, d)``, ``second (N, r)`` with ``second @ first`` the output-optimal rank-``r`` ``W``.

    ``w2d``: ``(N, d)``; ``s``: :func:`whitening` of the input covariance. Returned in ``w2d``'s dtype.
    """
    if rank < 1:
        raise ValueError(f"output_aware_factors: rank must be >= 1, got {rank}")
    u, sv, vh = torch.linalg.svd(w2d.to(torch.float64) @ s, full_matrices=False)
    r = min(rank, sv.numel())
    b = sv[:r, None] * vh[:r]  # (r, d): diag(s_r) V_r^T
    # first = b S^-1  <=>  first S = b  (S lower triangular)
    first = torch.linalg.solve_triangular(s, b, upper=False, left=False)
    return first.to(w2d.dtype).contiguous(), u[:, :r].to(w2d.dtype).contiguous()
