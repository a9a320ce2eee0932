"""Monarch (Dao et al., ICML 2022) and butterfly linear layers: the structured alternatives to ACDC.

Written from the papers' definitions, for comparison with :class:`~lightning_struct.nn.ACDCStack`
(``lightning-struct bench acdc``) and as drop-in ``nn.Linear`` replacements of their own.

* :class:`MonarchLinear`: ``M = P L P^T R`` on ``n = b1 * b2`` features, ``R`` block-diagonal
  with ``b1`` blocks of ``b2 x b2``, ``P`` the permutation that reads a ``(b1, b2)`` grid
  column-major, ``L`` block-diagonal with ``b2`` blocks of ``b1 x b1``: ``n (b1 + b2)``
  parameters (``2 n sqrt(n)`` when square), two batched GEMMs per call.
* :class:`ButterflyLinear`: the product of ``log2 n`` butterfly factors, factor ``i`` mixing
  the pairs ``(j, j + 2^i)`` inside blocks of ``2^(i+1)`` with its own ``2 x 2`` matrix per pair:
  ``2 n log2 n`` parameters (as many as an ACDC stack of ``log2 n`` factors without biases).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lightning_struct._checks import check_bool, check_int

__all__ = ["ButterflyLinear", "MonarchLinear", "monarch_blocks"]

_WHERE = "MonarchLinear"


def monarch_blocks(n: int) -> tuple[int, int]:
    """The squarest factorisation ``n = b1 * b2`` with ``b1 <= b2`` (``b1 = b2 = sqrt(n)`` for squares)."""
    b1 = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return b1, n // b1


class _SquareLinear(nn.Module):
    """A structured ``n x n`` linear map plus an optional bias: subclasses define :meth:`_map` on
    ``(B, n)`` rows; the input check, the bias and :meth:`dense_matrix` are shared."""

    features: int
    bias: nn.Parameter | None

    def _map(self, h: Tensor) -> Tensor:
        raise NotImplementedError

    def _init_bias(self) -> None:
        if self.bias is not None:
            self.bias.uniform_(-(self.features**-0.5), self.features**-0.5)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.features:
            raise ValueError(f"{type(self).__name__}: input has {x.shape[-1]} features, expected {self.features}")
        y = self._map(x.reshape(-1, self.features)).reshape(x.shape)
        return y if self.bias is None else y + self.bias

    def dense_matrix(self) -> Tensor:
        """The ``(n, n)`` matrix ``A`` of the map (``forward(x) = x @ A.T + bias``)."""
        p = next(self.parameters())
        return self._map(torch.eye(self.features, dtype=p.dtype, device=p.device)).T


class MonarchLinear(_SquareLinear):
    """``y = M x + bias`` with a Monarch matrix ``M = P L P^T R`` (see the module docstring).

    Args:
        features: ``n``, input and output size.
        blocks: ``b1``, the number of blocks of ``R`` (must divide ``n``; default: the squarest
            factorisation, :func:`monarch_blocks`).
        bias: add a learned bias of ``n``.

    The blocks start uniform: ``R``'s variance-preserving (bound ``sqrt(3/b2)``), ``L``'s as
    ``nn.Linear``'s (bound ``1/sqrt(b1)``), so the product has the output scale of a dense
    layer's default initialisation.
    """

    def __init__(
        self, features: int, blocks: int | None = None, bias: bool = True, *, device=None, dtype=None
    ) -> None:
        super().__init__()
        n = check_int(features, "features", _WHERE, minimum=1)
        if blocks is None:
            b1, b2 = monarch_blocks(n)
        else:
            b1 = check_int(blocks, "blocks", _WHERE, minimum=1)
            if n % b1:
                raise ValueError(f"{_WHERE}: blocks={b1} does not divide features={n}; allowed: a divisor of {n}")
            b2 = n // b1
        self.features, self.b1, self.b2 = n, b1, b2
        kw = dict(device=device, dtype=dtype)
        self.r = nn.Parameter(torch.empty(b1, b2, b2, **kw))  # b1 blocks acting on (b1, b2) rows
        self.l = nn.Parameter(torch.empty(b2, b1, b1, **kw))  # b2 blocks acting on the columns
        self.bias = nn.Parameter(torch.empty(n, **kw)) if check_bool(bias, "bias", _WHERE) else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.r.uniform_(-((3 / self.b2) ** 0.5), (3 / self.b2) ** 0.5)  # variance-preserving
            self.l.uniform_(-(self.b1**-0.5), self.b1**-0.5)
            self._init_bias()

    def _map(self, h: Tensor) -> Tensor:
        h = h.reshape(-1, self.b1, self.b2).transpose(0, 1)  # (b1, B, b2): row k of the grid
        h = torch.bmm(h, self.r.transpose(1, 2))  # R_k on each row
        h = torch.bmm(h.permute(2, 1, 0), self.l.transpose(1, 2))  # (b2, B, b1): L_j on each column
        return h.permute(1, 2, 0).reshape(-1, self.features)  # back to the (b1, b2) grid, row-major

    def extra_repr(self) -> str:
        return f"features={self.features}, blocks=({self.b1}x{self.b2}^2, {self.b2}x{self.b1}^2), bias={self.bias is not None}"


class ButterflyLinear(_SquareLinear):
    """``y = B x + bias`` with ``B`` a product of ``log2 n`` butterfly factors (module docstring).

    Args:
        features: ``n``, a power of two.
        bias: add a learned bias of ``n``.

    Every ``2 x 2`` block starts as a random rotation, so ``B`` starts orthogonal.
    """

    def __init__(self, features: int, bias: bool = True, *, device=None, dtype=None) -> None:
        super().__init__()
        n = check_int(features, "features", "ButterflyLinear", minimum=2)
        if n & (n - 1):
            raise ValueError(f"ButterflyLinear: features={n} must be a power of two (e.g. {1 << n.bit_length()})")
        self.features, self.levels = n, n.bit_length() - 1
        # twiddles[i]: (n / 2^(i+1) groups, 2^i pairs, 2 out, 2 in)
        self.twiddles = nn.ParameterList(
            nn.Parameter(torch.empty(n >> (i + 1), 1 << i, 2, 2, device=device, dtype=dtype)) for i in range(self.levels)
        )
        self.bias = (
            nn.Parameter(torch.empty(n, device=device, dtype=dtype)) if check_bool(bias, "bias", "ButterflyLinear") else None
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for t in self.twiddles:
                theta = torch.rand(t.shape[:2], dtype=t.dtype, device=t.device) * (2 * math.pi)
                c, s = theta.cos(), theta.sin()
                t.copy_(torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2))
            self._init_bias()

    def _map(self, h: Tensor) -> Tensor:
        for i, t in enumerate(self.twiddles):
            s = 1 << i
            hv = h.reshape(h.shape[0], self.features // (2 * s), 2, s)  # pairs (j, j + s) of each block
            h = torch.einsum("bgis,gsoi->bgos", hv, t).reshape(h.shape[0], self.features)
        return h
