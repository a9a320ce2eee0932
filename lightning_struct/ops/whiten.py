"""Output-aware (data-aware) truncated SVD: the rank-r factors that minimize a layer's *output* error.

For a layer ``y = W x`` (``W``: ``N x d``) seen on calibration inputs ``X`` (``n x d``, one row per
input vector; for a conv, one row per unfolded ``C kh kw`` patch), the rank-``r`` map minimizing
``||X (W - W_r)^T||_F`` is, with the input covariance ``X^T X = S S^T`` (Cholesky)::

    W S = U diag(s) V^T,    W_r = U_r diag(s_r) V_r^T S^-1

(SVD-LLM's truncation-aware whitening, in closed form): the error of rank ``r`` is
``sqrt(sum_{i>r} s_i^2)``, so the whitened singular values ``s`` play the role the weight's own
singular values play for the weight objective (energy rules, budgets). Factors: ``first =
diag(s_r) V_r^T S^-1`` (``r x d``, the ``d -> r`` layer) and ``second = U_r`` (``N x r``).

Sequential fitting (the inputs the layer will see after the layers before it were converted):
with dense rows ``X`` and converted rows ``X'`` of the same patches, the rank-``r`` ``B``
minimizing ``||X W^T - X' B^T||_F`` is reduced-rank regression. The unconstrained least squares
``B* = W M C'^-1`` (``M = X^T X'``, :func:`gram` of the paired blocks, ``C' = X'^T X' = S' S'^T``) splits the error into an
irreducible part plus ``||X' (B* - B)^T||``, so ``B_r`` is the output-optimal truncation of
``B*`` under ``S'``: the SVD of ``Z = B* S' = W M S'^-T`` (which is ``W S`` when ``X' = X``).

Numerics: the covariance is summed over blocks of rows in float64 (each block's product in the
inputs' dtype) and factorized in float64 with a ridge ``eps * tr(C)/d``
(so a rank-deficient calibration stays solvable; ``eps = 1e-6`` barely changes a full-rank one).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "gram",
    "gram_pair",
    "output_aware_factors",
    "patch_columns",
    "row_columns",
    "whitened_spectrum",
    "whitened_target",
    "whitening",
]


def patch_columns(
    x: Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    max_elements: int = 1 << 24,
    max_gram_elements: int = 1 << 22,
) -> Iterator[Tensor]:
    """The conv's input patches as column blocks ``(b, C * kh * kw, L)``, a few images at a time.

    ``F.unfold`` order, which is the weight's ``reshape(N, -1)`` order. Each block holds at most
    about ``max_elements`` values, and ``b`` copies of the ``d x d`` Gram at most about
    ``max_gram_elements`` (what :func:`gram` allocates per block).
    """
    kh, kw = int(kernel_size[0]), int(kernel_size[1])
    d = x.shape[1] * kh * kw
    per_image = max(1, x[:1].numel() * kh * kw)
    step = max(1, min(max_elements // per_image, max_gram_elements // (d * d)))
    for i in range(0, x.shape[0], step):
        yield F.unfold(x[i : i + step], (kh, kw), dilation=tuple(dilation), padding=tuple(padding), stride=tuple(stride))


def row_columns(x: Tensor, dim: int, max_rows: int = 1 << 14) -> Iterator[Tensor]:
    """Row vectors ``(..., dim)`` as column blocks ``(1, dim, n)`` of at most ``max_rows`` (views)."""
    rows = x.reshape(-1, dim)
    for i in range(0, rows.shape[0], max_rows):
        yield rows[i : i + max_rows].T.unsqueeze(0)


def _block_product(a: Tensor, b: Tensor) -> Tensor:
    """``sum_k a_k b_k^T`` over the blocks of ``(b, d, n)`` column blocks, in their dtype."""
    return (a @ b.mT).sum(0) if a.shape[0] > 1 else a[0] @ b[0].mT


def gram(blocks: Iterable[Tensor], others: Iterable[Tensor] | None = None) -> tuple[Tensor, int]:
    """``sum_i A_i B_i^T`` over column blocks ``A_i``, ``B_i`` (``(b, d, n_i)``; ``B = A`` when
    ``others`` is not given) and the number of columns.

    Each block's product is formed in the blocks' dtype (float32 for a float32 model: no float64
    copy of the unfolded patches) and the blocks are summed in float64.
    """
    acc: Tensor | None = None
    n = 0
    pairs = ((a, a) for a in blocks) if others is None else zip(blocks, others, strict=True)
    for a, b in pairs:
        if a.shape != b.shape:
            raise ValueError(f"gram: paired column blocks differ in shape ({tuple(a.shape)} vs {tuple(b.shape)})")
        prod = _block_product(a, b)
        acc = prod.to(torch.float64) if acc is None else acc.add_(prod)
        n += a.shape[0] * a.shape[2]
    if acc is None:
        raise ValueError("gram: no calibration rows")
    return acc, n


def gram_pair(dense: Iterable[Tensor], converted: Iterable[Tensor]) -> tuple[Tensor, Tensor, int]:
    """``sum B_i B_i^T``, ``sum A_i B_i^T`` and the number of columns, in one pass over paired column
    blocks ``A_i`` (dense inputs) and ``B_i`` (converted inputs): what sequential fitting needs,
    each block unfolded once. Products in the blocks' dtype, sums in float64, as :func:`gram`."""
    cov: Tensor | None = None
    cross: Tensor | None = None
    n = 0
    for a, b in zip(dense, converted, strict=True):
        if a.shape != b.shape:
            raise ValueError(f"gram_pair: paired column blocks differ in shape ({tuple(a.shape)} vs {tuple(b.shape)})")
        bb, ab = _block_product(b, b), _block_product(a, b)
        cov = bb.to(torch.float64) if cov is None else cov.add_(bb)
        cross = ab.to(torch.float64) if cross is None else cross.add_(ab)
        n += b.shape[0] * b.shape[2]
    if cov is None or cross is None:
        raise ValueError("gram_pair: no calibration rows")
    return cov, cross, n


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


def whitened_target(w2d: Tensor, s: Tensor, cross: Tensor | None = None) -> Tensor:
    """The matrix whose truncated SVD gives the output-optimal factors (float64).

    ``W S`` for the plain output objective; ``W M S^-T`` for sequential fitting, where ``M`` is
    the cross :func:`gram` of the dense and converted inputs and ``S`` whitens the
    converted inputs' covariance, scaled alike (both sums, or both divided by the same ``n``).
    """
    w64 = w2d.to(torch.float64)
    if cross is None:
        return w64 @ s
    # Z^T = S^-1 (W M)^T
    return torch.linalg.solve_triangular(s, (w64 @ cross.to(torch.float64)).T, upper=False).T


def whitened_spectrum(w2d: Tensor, s: Tensor, cross: Tensor | None = None) -> Tensor:
    """Singular values of :func:`whitened_target` (the output-error spectrum), descending, float64."""
    return torch.linalg.svdvals(whitened_target(w2d, s, cross))


def output_aware_factors(w2d: Tensor, s: Tensor, rank: int, cross: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``first (r, d)``, ``second (N, r)`` with ``second @ first`` the output-optimal rank-``r`` ``W``.

    ``w2d``: ``(N, d)``; ``s``: :func:`whitening` of the input covariance (of the converted
    inputs when ``cross`` is given: then the factors are the reduced-rank regression of the dense
    outputs on those inputs). Returned in ``w2d``'s dtype.
    """
    if rank < 1:
        raise ValueError(f"output_aware_factors: rank must be >= 1, got {rank}")
    u, sv, vh = torch.linalg.svd(whitened_target(w2d, s, cross), full_matrices=False)
    r = min(rank, sv.numel())
    b = sv[:r, None] * vh[:r]  # (r, d): diag(s_r) V_r^T
    # first = b S^-1  <=>  first S = b  (S lower triangular)
    first = torch.linalg.solve_triangular(s, b, upper=False, left=False)
    return first.to(w2d.dtype).contiguous(), u[:, :r].to(w2d.dtype).contiguous()
