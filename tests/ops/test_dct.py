"""Orthonormal DCT-II / DCT-III via FFT against scipy and the dense DCT matrix."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_struct.ops.dct import (
    dct,
    dct_matrix,
    dct_to_packed,
    idct,
    makhoul_index,
    packed_to_dct,
)

LENGTHS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 15, 16, 17, 64, 100, 127]


@pytest.mark.parametrize("n", LENGTHS)
def test_dct_matches_scipy_and_dense_matrix(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    x = torch.randn(3, n, generator=g, dtype=torch.float64)
    ours = dct(x)
    ref = torch.from_numpy(scipy.fft.dct(x.numpy(), type=2, norm="ortho", axis=-1))
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(ours, x @ dct_matrix(n).T, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", LENGTHS)
def test_idct_matches_scipy_and_is_inverse(n: int) -> None:
    g = torch.Generator().manual_seed(100 + n)
    x = torch.randn(2, 3, n, generator=g, dtype=torch.float64)
    ours = idct(x)
    ref = torch.from_numpy(scipy.fft.idct(x.numpy(), type=2, norm="ortho", axis=-1))
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(ours, x @ dct_matrix(n), rtol=0, atol=1e-12)
    torch.testing.assert_close(idct(dct(x)), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(dct(idct(x)), x, rtol=0, atol=1e-12)


def test_dense_matrix_is_orthogonal() -> None:
    c = dct_matrix(13)
    torch.testing.assert_close(c @ c.T, torch.eye(13, dtype=torch.float64), rtol=0, atol=1e-13)
    # first row is constant 1/sqrt(n), a known closed form
    torch.testing.assert_close(c[0], torch.full((13,), 13**-0.5, dtype=torch.float64))


@settings(max_examples=30, deadline=None)
@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    n=st.integers(1, 40),
    data=st.data(),
)
def test_any_dim_matches_scipy(shape: list[int], n: int, data: st.DataObject) -> None:
    pos = data.draw(st.integers(0, len(shape)))
    full = shape[:pos] + [n] + shape[pos:]
    rng = np.random.default_rng(n * 7 + pos)
    x = rng.standard_normal(full)
    dim = data.draw(st.sampled_from([pos, pos - len(full)]))
    ours = dct(torch.from_numpy(x), dim=dim)
    assert ours.shape == tuple(full)
    np.testing.assert_allclose(ours.numpy(), scipy.fft.dct(x, norm="ortho", axis=pos), atol=1e-12, rtol=0)
    back = idct(ours, dim=dim)
    np.testing.assert_allclose(back.numpy(), x, atol=1e-12, rtol=0)


def test_float32_accuracy_and_dtype() -> None:
    x = torch.randn(8, 4096)
    X = dct(x)
    assert X.dtype == torch.float32
    ref = scipy.fft.dct(x.double().numpy(), norm="ortho")
    np.testing.assert_allclose(X.numpy(), ref, atol=2e-5, rtol=0)
    np.testing.assert_allclose(idct(X).numpy(), x.numpy(), atol=2e-5, rtol=0)


def test_half_precision_is_computed_in_float32() -> None:
    x = torch.randn(4, 33).to(torch.bfloat16)
    X = dct(x)
    assert X.dtype == torch.bfloat16
    torch.testing.assert_close(X.float(), dct(x.float()).bfloat16().float())


@pytest.mark.parametrize("n", [1, 5, 8])
def test_gradcheck_float64(n: int) -> None:
    x = torch.randn(2, n, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: dct(t, dim=1), (x,))
    assert torch.autograd.gradcheck(lambda t: idct(t, dim=1), (x,))


def test_double_backward() -> None:
    x = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: dct(t) ** 2, (x,))


def test_backward_is_the_adjoint() -> None:
    # grad of <dct(x), y> w.r.t. x is C^T y = idct(y)
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    y = torch.randn(5, 12, dtype=torch.float64)
    (dct(x) * y).sum().backward()
    torch.testing.assert_close(x.grad, y @ dct_matrix(12), rtol=0, atol=1e-13)


@pytest.mark.parametrize("n", [1, 2, 7, 10])
def test_packing_round_trip(n: int) -> None:
    x = torch.randn(4, n, dtype=torch.float64)
    p = dct_to_packed(x)
    assert p.shape == (4, n // 2 + 1) and p.is_complex()
    torch.testing.assert_close(packed_to_dct(p, n), x, rtol=0, atol=0)
    order, inverse = makhoul_index(n)
    torch.testing.assert_close(x[:, order][:, inverse], x, rtol=0, atol=0)
    assert order[: (n + 1) // 2].tolist() == list(range(0, n, 2))


def test_bad_inputs_raise() -> None:
    with pytest.raises(TypeError, match="real floating-point"):
        dct(torch.arange(4))
    with pytest.raises(TypeError, match="real floating-point"):
        idct(torch.randn(4, dtype=torch.complex64))
    with pytest.raises(ValueError, match="dim=2"):
        dct(torch.randn(3, 4), dim=2)
    with pytest.raises(ValueError, match="n must be >= 1"):
        dct_matrix(0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    x = torch.randn(16, 4096 + 3, dtype=torch.float64)
    torch.testing.assert_close(dct(x.cuda()).cpu(), dct(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(idct(x.cuda(), dim=0).cpu(), idct(x, dim=0), rtol=0, atol=1e-12)
    xf = x.float().cuda().requires_grad_()
    dct(xf).pow(2).sum().backward()
    torch.testing.assert_close(xf.grad, 2 * xf.detach(), rtol=1e-4, atol=1e-4)
