"""Small dense linear-algebra helpers shared by the ops."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["symmetric_gram"]


def symmetric_gram(w: Tensor, edges: Sequence[int] | None = None) -> Tensor:
    """``w @ w^T`` ``(G, M, M)`` for ``w`` ``(G, M, D)``.

    With row block ``edges`` (``0 = e_0 < ... < e_b = M``), one GEMM per block row of the upper
    triangle (the diagonal block and everything right of it) and the blocks below the diagonal
    mirrored (the same products, not recomputed): about ``(b + 1) / 2b`` of the multiply-adds.
    ``None`` (or one block): one ``bmm``.
    """
    if edges is None or len(edges) < 3:
        return torch.bmm(w, w.transpose(1, 2))
    G, M, _ = w.shape
    c = torch.empty(G, M, M, dtype=w.dtype, device=w.device)
    for lo, hi in zip(edges, edges[1:]):
        c[:, lo:hi, lo:] = torch.bmm(w[:, lo:hi], w[:, lo:].transpose(1, 2))
        c[:, hi:, lo:hi] = c[:, lo:hi, hi:].transpose(1, 2)
    return c
