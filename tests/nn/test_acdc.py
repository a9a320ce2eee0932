"""ACDC layers: exact against explicit dense matrices, gradients, parameter counts, shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_struct.nn import ACDC, ACDCConv1x1, ACDCStack
from lightning_struct.ops.acdc import acdc_stack, acdc_stack_reference, prepare_permutations
from lightning_struct.ops.dct import dct_matrix

D = torch.float64


def _randomize(module: nn.Module, seed: int = 0) -> None:
    """Move parameters away from the identity so that tests can see every term."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            centre = 0.0 if name.endswith("bias") else 1.0
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5 + centre)


def _factor_matrix(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    c = dct_matrix(a.shape[-1])
    return c.T @ torch.diag(d) @ c @ torch.diag(a)


@pytest.mark.parametrize("n", [1, 2, 7, 16])
def test_acdc_equals_explicit_dense_product(n: int) -> None:
    layer = ACDC(n, dtype=D)
    _randomize(layer, n)
    x = torch.randn(5, n, dtype=D)
    a, d, ab, db = layer.a, layer.d, layer.a_bias, layer.d_bias
    c = dct_matrix(n)
    # y = C^T (d * C (a * x + a_b) + d_b) written with explicit matrices (A, C, D, C^T)
    expected = (c.T @ (torch.diag(d) @ c @ (torch.diag(a) @ x.T + ab[:, None]) + db[:, None])).T
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.dense_matrix(), _factor_matrix(a, d), rtol=0, atol=1e-12)
    lin = layer.to_dense()
    torch.testing.assert_close(lin(x), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
def test_stack_without_relu_is_product_of_dense_factors_and_permutations(bias: bool) -> None:
    n, k = 9, 4
    stack = ACDCStack(n, n_factors=k, relu=False, permute=True, bias=bias, seed=3, dtype=D)
    _randomize(stack, 1)
    assert stack.permutations is not None and stack.permutations.shape == (k - 1, n)
    # column convention: x_{k+1} = P_k y_k with (P_k y)[i] = y[perm[i]]
    m = torch.eye(n, dtype=D)
    b = torch.zeros(n, dtype=D)
    c = dct_matrix(n)
    for i in range(k):
        f = _factor_matrix(stack.a[i], stack.d[i])
        m = f @ m
        if bias:
            b = f @ b + c.T @ (stack.d[i] * (c @ stack.a_bias[i])) + c.T @ stack.d_bias[i]
        if i < k - 1:
            p = torch.eye(n, dtype=D)[stack.permutations[i]]
            m, b = p @ m, p @ b
    x = torch.randn(6, n, dtype=D)
    torch.testing.assert_close(stack(x), x @ m.T + b, rtol=0, atol=1e-11)
    torch.testing.assert_close(stack.dense_matrix(), m, rtol=0, atol=1e-11)
    torch.testing.assert_close(stack.dense_bias(), b, rtol=0, atol=1e-11)
    torch.testing.assert_close(stack.to_dense()(x), stack(x), rtol=0, atol=1e-11)


@pytest.mark.parametrize("n", [6, 7])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("permute", [False, True])
def test_fast_path_matches_reference_values_and_gradients(n: int, relu: bool, permute: bool) -> None:
    g = torch.Generator().manual_seed(n)
    k = 3
    a, d, ab, db = (
        torch.randn(k, n, generator=g, dtype=D).mul(0.4).add(1).requires_grad_() for _ in range(4)
    )
    perms = torch.stack([torch.randperm(n, generator=g) for _ in range(k - 1)]) if permute else None
    x = torch.randn(2, 3, n, generator=g, dtype=D, requires_grad=True)
    args = (x, a, d, ab, db)
    fast = acdc_stack(*args, perms, relu)
    ref = acdc_stack_reference(*args, perms, relu)
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-12)
    w = torch.randn(fast.shape, generator=g, dtype=D)
    g_fast = torch.autograd.grad((fast * w).sum(), args)
    g_ref = torch.autograd.grad((ref * w).sum(), args)
    for gf, gr in zip(g_fast, g_ref):
        torch.testing.assert_close(gf, gr, rtol=0, atol=1e-11)
    assert torch.autograd.gradcheck(lambda *t: acdc_stack(*t, perms, relu), args, fast_mode=True)


def test_module_gradcheck_small() -> None:
    stack = ACDCStack(5, 3, n_factors=2, relu=False, dtype=D)
    _randomize(stack, 2)
    x = torch.randn(2, 5, dtype=D, requires_grad=True)
    params = tuple(stack.parameters())

    def f(x: torch.Tensor, *ps: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(
            stack, dict(zip([n for n, _ in stack.named_parameters()], ps)), (x,)
        )

    assert torch.autograd.gradcheck(f, (x, *params))


def test_no_bias_and_no_input_grad_paths() -> None:
    stack = ACDCStack(8, n_factors=3, bias=False, dtype=D)
    _randomize(stack, 4)
    x = torch.randn(3, 8, dtype=D)  # no requires_grad: backward must still give parameter grads
    stack(x).square().sum().backward()
    ref = ACDCStack(8, n_factors=3, bias=False, dtype=D)
    ref.load_state_dict(stack.state_dict())
    out = acdc_stack_reference(x, ref.a, ref.d, None, None, ref.permutations, True)
    out.square().sum().backward()
    torch.testing.assert_close(stack.a.grad, ref.a.grad, rtol=0, atol=1e-11)
    torch.testing.assert_close(stack.d.grad, ref.d.grad, rtol=0, atol=1e-11)


def test_parameter_counts() -> None:
    assert sum(p.numel() for p in ACDC(100).parameters()) == 400
    assert sum(p.numel() for p in ACDC(100, bias=False).parameters()) == 200
    assert sum(p.numel() for p in ACDCStack(100, n_factors=12).parameters()) == 12 * 400
    assert sum(p.numel() for p in ACDCStack(100, n_factors=12, bias=False).parameters()) == 12 * 200
    # rectangular: N = max(in, out)
    assert sum(p.numel() for p in ACDCStack(30, 70, n_factors=2).parameters()) == 2 * 4 * 70
    # buffers are not parameters
    s = ACDCStack(4096, n_factors=12)
    n_params = sum(p.numel() for p in s.parameters())
    assert n_params == 196_608 and 4096 * 4096 + 4096 > 85 * n_params


@pytest.mark.parametrize(("fin", "fout"), [(5, 11), (11, 5)])
def test_rectangular_pads_and_crops(fin: int, fout: int) -> None:
    stack = ACDCStack(fin, fout, n_factors=2, relu=False, dtype=D)
    _randomize(stack, 5)
    x = torch.randn(4, fin, dtype=D)
    y = stack(x)
    assert y.shape == (4, fout)
    square = ACDCStack(max(fin, fout), n_factors=2, relu=False, dtype=D)
    square.load_state_dict(stack.state_dict())
    expected = square(F.pad(x, (0, max(fin, fout) - fin)))[:, :fout]
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    assert stack.dense_matrix().shape == (fout, fin)
    torch.testing.assert_close(stack.to_dense()(x), y, rtol=0, atol=1e-12)


def test_identity_init_and_seeded_permutations() -> None:
    torch.manual_seed(0)
    s = ACDCStack(16, n_factors=3, relu=False, permute=False, sigma=0.0)
    x = torch.randn(2, 16)
    torch.testing.assert_close(s(x), x, rtol=0, atol=1e-5)
    s1, s2, s3 = (
        ACDCStack(16, n_factors=4, seed=7),
        ACDCStack(16, n_factors=4, seed=7),
        ACDCStack(16, n_factors=4, seed=8),
    )
    assert torch.equal(s1.permutations, s2.permutations) and not torch.equal(s1.permutations, s3.permutations)
    assert all(sorted(p.tolist()) == list(range(16)) for p in s1.permutations)
    assert "permutations" in s1.state_dict()
    w = ACDCStack(64, sigma=0.05)
    assert abs(w.a.mean().item() - 1) < 0.02 and 0.03 < w.a.std().item() < 0.07
    assert torch.all(w.a_bias == 0)


def test_loaded_permutations_are_used() -> None:
    s = ACDCStack(8, n_factors=3, relu=False, dtype=D)
    x = torch.randn(2, 8, dtype=D)
    y0 = s(x)  # fills the cache
    other = ACDCStack(8, n_factors=3, relu=False, seed=1, dtype=D)
    other.load_state_dict({**s.state_dict(), "permutations": other.permutations})
    s.load_state_dict(other.state_dict())
    assert not torch.allclose(s(x), y0)
    torch.testing.assert_close(s(x), other(x), rtol=0, atol=0)


def test_relu_stack_refuses_dense_matrix() -> None:
    with pytest.raises(ValueError, match="relu=False"):
        ACDCStack(8, n_factors=2, relu=True).dense_matrix()


def test_conv1x1_equals_linear_per_pixel() -> None:
    conv = ACDCConv1x1(6, 10, n_factors=2, relu=False, dtype=D)
    _randomize(conv, 6)
    x = torch.randn(2, 6, 5, 4, dtype=D)
    y = conv(x)
    assert y.shape == (2, 10, 5, 4)
    lin = conv.stack.to_dense()
    expected = lin(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(conv.to_dense()(x), y, rtol=0, atol=1e-12)
    # with ReLUs it still acts pixel by pixel
    conv2 = ACDCConv1x1(6, 6, n_factors=3, stride=2, dtype=D)
    y2 = conv2(x)
    assert y2.shape == (2, 6, 3, 2)
    torch.testing.assert_close(y2[:, :, 1, 1], conv2.stack(x[:, :, 2, 2]), rtol=0, atol=0)


def test_float32_batched_leading_dims_and_dtype() -> None:
    s = ACDCStack(12, 7, n_factors=3)
    x = torch.randn(2, 3, 12)
    y = s(x)
    assert y.shape == (2, 3, 7) and y.dtype == torch.float32
    torch.testing.assert_close(y[1, 2], s(x[1, 2][None])[0])


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="n_factors"):
        ACDCStack(8, n_factors=0)
    with pytest.raises(ValueError, match="in_features=8.0 must be an int"):
        ACDCStack(8.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sigma"):
        ACDC(8, sigma=-1.0)
    with pytest.raises(ValueError, match=r"expected input \(\.\.\., 8\)"):
        ACDCStack(8)(torch.randn(2, 9))
    with pytest.raises(ValueError, match="permutations must have shape"):
        acdc_stack(
            torch.randn(2, 4),
            torch.ones(3, 4),
            torch.ones(3, 4),
            permutations=torch.zeros(3, 4, dtype=torch.long),
        )
    with pytest.raises(ValueError, match="expected int64"):
        prepare_permutations(torch.zeros(2, 4, dtype=torch.int32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    s = ACDCStack(300, 200, n_factors=4, dtype=D)
    _randomize(s, 7)
    x = torch.randn(16, 300, dtype=D)
    s_gpu = ACDCStack(300, 200, n_factors=4, dtype=D).cuda()
    s_gpu.load_state_dict(s.state_dict())
    torch.testing.assert_close(s_gpu(x.cuda()).cpu(), s(x), rtol=0, atol=1e-10)
    s_gpu(x.cuda()).sum().backward()
    s(x).sum().backward()
    torch.testing.assert_close(s_gpu.a.grad.cpu(), s.a.grad, rtol=0, atol=1e-9)
