"""Monarch and butterfly layers against their defining products of explicit sparse matrices."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_struct.nn import ButterflyLinear, MonarchLinear
from lightning_struct.nn.monarch import monarch_blocks


def _grid_transpose(b1: int, b2: int) -> torch.Tensor:
    """P: the permutation matrix with (P v)[i*b2 + j] = v[j*b1 + i] (a (b1, b2) grid read column-major)."""
    n = b1 * b2
    P = torch.zeros(n, n, dtype=torch.float64)
    for i in range(b1):
        for j in range(b2):
            P[i * b2 + j, j * b1 + i] = 1.0
    return P


@pytest.mark.parametrize("n,blocks", [(16, None), (12, 3), (12, 2), (64, 4), (7, 1)])
def test_monarch_is_P_L_Pt_R(n, blocks):
    torch.manual_seed(0)
    m = MonarchLinear(n, blocks, bias=True, dtype=torch.float64)
    b1, b2 = m.b1, m.b2
    R = torch.block_diag(*m.r.detach())
    L = torch.block_diag(*m.l.detach())
    P = _grid_transpose(b1, b2)
    M = P @ L @ P.T @ R
    torch.testing.assert_close(m.dense_matrix().detach(), M)
    x = torch.randn(5, 3, n, dtype=torch.float64)
    torch.testing.assert_close(m(x), x @ M.T + m.bias.detach())
    assert sum(p.numel() for p in m.parameters()) == n * (b1 + b2) + n


def test_monarch_defaults_and_errors():
    assert monarch_blocks(1024) == (32, 32) and monarch_blocks(12) == (3, 4) and monarch_blocks(13) == (1, 13)
    with pytest.raises(ValueError, match="blocks=5 does not divide features=12"):
        MonarchLinear(12, 5)
    with pytest.raises(ValueError, match="expected 12"):
        MonarchLinear(12)(torch.randn(2, 8))
    # the default initialisation keeps the scale of its input (as nn.Linear's)
    torch.manual_seed(0)
    x = torch.randn(4096, 256)
    ratio = MonarchLinear(256, bias=False)(x).std() / (torch.nn.Linear(256, 256, bias=False)(x).std())
    assert 0.7 < float(ratio) < 1.4


def _butterfly_factor(t: torch.Tensor, n: int, i: int) -> torch.Tensor:
    """Factor i as a dense matrix: pairs (g*2s + k, g*2s + s + k) mixed by t[g, k]."""
    s = 1 << i
    F = torch.zeros(n, n, dtype=torch.float64)
    for g in range(n // (2 * s)):
        for k in range(s):
            idx = [g * 2 * s + k, g * 2 * s + s + k]
            for o in range(2):
                for j in range(2):
                    F[idx[o], idx[j]] = t[g, k, o, j]
    return F


@pytest.mark.parametrize("n", [2, 8, 32])
def test_butterfly_is_the_product_of_its_factors_and_starts_orthogonal(n):
    torch.manual_seed(1)
    b = ButterflyLinear(n, dtype=torch.float64)
    B = torch.eye(n, dtype=torch.float64)
    for i, t in enumerate(b.twiddles):
        B = _butterfly_factor(t.detach(), n, i) @ B
    torch.testing.assert_close(b.dense_matrix().detach(), B)
    torch.testing.assert_close(B @ B.T, torch.eye(n, dtype=torch.float64))
    x = torch.randn(4, n, dtype=torch.float64)
    torch.testing.assert_close(b(x), x @ B.T + b.bias.detach())
    assert sum(p.numel() for p in b.parameters()) == 2 * n * int(math.log2(n)) + n
    with pytest.raises(ValueError, match="power of two"):
        ButterflyLinear(12)


def test_gradients_flow_to_every_block():
    torch.manual_seed(2)
    for layer in (MonarchLinear(16), ButterflyLinear(16)):
        layer(torch.randn(3, 16)).square().sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
