"""LFA singular values against the explicit unrolled matrix of circular-padded ``F.conv*d``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_struct.ops.spectral import (
    SPECTRUM_STATS,
    clip_conv_operator_norm,
    conv_singular_values,
    conv_spectral_norm,
    conv_spectrum,
    conv_symbol,
    explicit_conv_matrix,
    frequency_mode,
    linear_spectrum,
    lipschitz_bound,
    model_spectra,
    module_spectral_norm,
    module_spectrum,
    reshape_bound,
    spectral_config,
)


def _reference(w: torch.Tensor, n, **kw) -> torch.Tensor:
    """All singular values of the explicit matrix (pushing basis vectors through F.conv*d), descending."""
    return torch.linalg.svdvals(explicit_conv_matrix(w, n, **kw))


def _unrolled_by_hand(w: torch.Tensor, n: tuple[int, int], stride: int) -> torch.Tensor:
    """Independent 2-D reference: the matrix entries written from the definition, no F.conv2d."""
    co, ci, k1, k2 = w.shape
    m1, m2 = n[0] // stride, n[1] // stride
    M = torch.zeros(co, m1, m2, ci, n[0], n[1], dtype=w.dtype)
    for a in range(m1):
        for b in range(m2):
            for u in range(k1):
                for v in range(k2):
                    M[:, a, b, :, (a * stride + u) % n[0], (b * stride + v) % n[1]] += w[:, :, u, v]
    return M.reshape(co * m1 * m2, ci * n[0] * n[1])


# (C_out, C_in/groups, kernel, input_size, stride, dilation, groups)
CASES = [
    pytest.param(3, 2, (3, 3), (6, 6), 1, 1, 1, id="3x3"),
    pytest.param(3, 2, (3, 3), (8, 8), 2, 1, 1, id="3x3-stride2"),
    pytest.param(2, 3, (3, 3), (8, 6), 2, 1, 1, id="3x3-stride2-rect-input-wide"),
    pytest.param(4, 4, (2, 2), (6, 6), 1, 1, 1, id="even-2x2"),
    pytest.param(4, 4, (4, 4), (8, 8), 2, 1, 1, id="even-4x4-stride2"),
    pytest.param(4, 3, (2, 3), (6, 5), 1, 1, 1, id="rect-kernel-rect-input"),
    pytest.param(4, 3, (1, 3), (4, 6), (2, 1), 1, 1, id="anisotropic-stride"),
    pytest.param(4, 3, (3, 3), (7, 6), 1, 2, 1, id="dilation2"),
    pytest.param(3, 2, (3, 3), (8, 8), 2, (2, 1), 1, id="dilation-stride"),
    pytest.param(4, 3, (3, 3), (6, 6), 1, 1, 2, id="groups2"),
    pytest.param(6, 1, (3, 3), (6, 6), 1, 1, 6, id="depthwise"),
    pytest.param(12, 1, (3, 3), (6, 6), 2, 1, 6, id="depthwise-multiplier2-stride2"),
    pytest.param(5, 3, (3, 3), (6, 6), 3, 1, 1, id="stride3"),
    pytest.param(5, 3, (1, 1), (4, 6), 2, 1, 1, id="1x1-stride2"),
    pytest.param(3, 5, (1, 1), (4, 4), 1, 1, 1, id="1x1"),
    pytest.param(2, 7, (3, 3), (4, 4), 2, 1, 1, id="cout-smaller-than-S-cin"),
]


@pytest.mark.parametrize("co,ci,k,n,stride,dilation,groups", CASES)
def test_all_singular_values_match_explicit_matrix(co, ci, k, n, stride, dilation, groups):
    torch.manual_seed(0)
    w = torch.randn(co, ci, *k, dtype=torch.float64)
    ref = _reference(w, n, stride=stride, dilation=dilation, groups=groups)
    ours = conv_singular_values(w, n, stride=stride, dilation=dilation, groups=groups)  # float64 -> "svd"
    assert ours.dtype == torch.float64
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-12 * float(ref[0]))
    # the Gram route: exact for the large values, absolute floor ~sqrt(eps) sigma_max for tiny ones
    gram = conv_singular_values(w, n, stride=stride, dilation=dilation, groups=groups, method="gram")
    torch.testing.assert_close(gram, ref, rtol=1e-5, atol=1e-7 * float(ref[0]))
    # the spectral norm, exact path and fast path
    assert float(conv_spectral_norm(w, n, stride=stride, dilation=dilation, groups=groups)) == pytest.approx(
        float(ref[0]), rel=1e-9
    )


def test_explicit_matrix_is_the_definition():
    """The reference itself (F.conv2d with circular padding) against entries written by hand."""
    torch.manual_seed(1)
    w = torch.randn(3, 2, 3, 2, dtype=torch.float64)
    for stride in (1, 2):
        torch.testing.assert_close(
            explicit_conv_matrix(w, (6, 4), stride=stride), _unrolled_by_hand(w, (6, 4), stride)
        )


def test_conv1d_and_conv3d():
    torch.manual_seed(2)
    w1 = torch.randn(3, 2, 4, dtype=torch.float64)
    torch.testing.assert_close(
        conv_singular_values(w1, 8, stride=2), _reference(w1, 8, stride=2), rtol=1e-5, atol=1e-12
    )
    w3 = torch.randn(3, 2, 2, 3, 2, dtype=torch.float64)
    torch.testing.assert_close(
        conv_singular_values(w3, (4, 3, 4), stride=(2, 1, 1)),
        _reference(w3, (4, 3, 4), stride=(2, 1, 1)),
        rtol=1e-5,
        atol=1e-12,
    )


@settings(max_examples=30, deadline=None)
@given(
    co=st.integers(1, 4),
    ci=st.integers(1, 3),
    groups=st.integers(1, 2),
    k1=st.integers(1, 3),
    k2=st.integers(1, 4),
    s1=st.integers(1, 2),
    s2=st.integers(1, 3),
    m1=st.integers(1, 3),
    m2=st.integers(1, 3),
    d1=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_property_random_shapes(co, ci, groups, k1, k2, s1, s2, m1, m2, d1, seed):
    n = (s1 * m1 + (s1 if (k1 - 1) * d1 >= s1 * m1 else 0), s2 * m2 + (s2 if k2 > s2 * m2 else 0))
    if (k1 - 1) * d1 >= n[0] or k2 > n[1]:  # F.pad(circular) needs the padding below the input size
        return
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(co * groups, ci, k1, k2, dtype=torch.float64, generator=g)
    kw = dict(stride=(s1, s2), dilation=(d1, 1), groups=groups)
    ref = _reference(w, n, **kw)
    spec = conv_spectrum(w, n, **kw)
    assert (
        spec.count == ref.numel() == min(co * groups * math.prod(n) // (s1 * s2), ci * groups * math.prod(n))
    )
    assert int(spec.multiplicity.sum()) == (n[0] // s1) * (n[1] // s2)
    torch.testing.assert_close(spec.values(), ref, rtol=1e-5, atol=1e-12 * float(ref[0]))
    # upper bound that holds for any stride / dilation / padding
    assert float(spec.sigma_max) <= float(spec.reshape_bound) * (1 + 1e-12)
    assert float(conv_spectral_norm(w, n, **kw)) == pytest.approx(float(ref[0]), rel=1e-9)


@pytest.mark.parametrize("n", [(5, 7), (6, 8), (1, 2), (3, 1)])
def test_half_grid_counts_self_conjugate_frequencies_once(n):
    torch.manual_seed(3)
    w = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    half, mult = conv_symbol(w, n)
    full, _ = conv_symbol(w, n, half=False)
    assert int(mult.sum()) == math.prod(n) == full.shape[0]
    from_half = (
        torch.linalg.svdvals(half)
        .reshape(half.shape[0], -1)
        .repeat_interleave(mult, 0)
        .flatten()
        .sort()
        .values
    )
    from_full = torch.linalg.svdvals(full).flatten().sort().values
    torch.testing.assert_close(from_half, from_full)


def test_symbol_formula_at_one_frequency():
    """B(Theta) = S^{-1/2} [A(theta_a)] with A(theta) = sum_u w_u exp(i theta.u dil), written out."""
    torch.manual_seed(4)
    w = torch.randn(3, 2, 3, 2, dtype=torch.float64)
    n, s, dil = (8, 6), (2, 3), (1, 2)
    B, _ = conv_symbol(w, n, stride=s, dilation=dil, half=False)
    m = (n[0] // s[0], n[1] // s[1])
    J = (3, 1)
    cols = []
    for a1 in range(s[0]):
        for a2 in range(s[1]):
            th = (2 * math.pi * (J[0] + a1 * m[0]) / n[0], 2 * math.pi * (J[1] + a2 * m[1]) / n[1])
            A = sum(
                w[:, :, u, v].to(torch.complex128)
                * complex(
                    math.cos(th[0] * u * dil[0] + th[1] * v * dil[1]),
                    math.sin(th[0] * u * dil[0] + th[1] * v * dil[1]),
                )
                for u in range(3)
                for v in range(2)
            )
            cols.append(A)
    expected = torch.cat(cols, 1) / math.sqrt(s[0] * s[1])
    torch.testing.assert_close(B[J[0] * m[1] + J[1], 0], expected)


def test_statistics_against_explicit_svd():
    torch.manual_seed(5)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    ref = _reference(w, (6, 6))
    spec = conv_spectrum(w, (6, 6))
    assert float(spec.sigma_max) == pytest.approx(float(ref[0]))
    assert float(spec.sigma_min) == pytest.approx(float(ref[-1]))
    assert float(spec.condition_number) == pytest.approx(float(ref[0] / ref[-1]))
    assert float(spec.lambda_max) == pytest.approx(float(ref[0] ** 2))
    assert float(spec.frobenius_sq) == pytest.approx(float((ref**2).sum()))
    assert float(spec.frobenius_sq) == pytest.approx(36 * float((w**2).sum()))  # ||K||_F^2 = N ||w||^2
    assert float(spec.stable_rank) == pytest.approx(float((ref**2).sum() / ref[0] ** 2))
    p = ref / ref.sum()
    assert float(spec.effective_rank) == pytest.approx(float(torch.exp(-(p * p.log()).sum())))
    assert float(spec.reshape_bound) == pytest.approx(
        3 * float(torch.linalg.matrix_norm(w.reshape(4, -1), 2))
    )
    assert float(reshape_bound(w)) == pytest.approx(float(spec.reshape_bound))
    stats = spec.stats()
    assert set(stats) == {
        "sigma_max",
        "sigma_min",
        "condition_number",
        "stable_rank",
        "effective_rank",
        "reshape_bound",
    }
    assert 1 <= stats["stable_rank"] <= stats["effective_rank"] <= spec.count


def test_rank_deficient_operator_has_infinite_condition_number():
    w = torch.zeros(2, 2, 3, 3, dtype=torch.float64)
    w[0, 0, 1, 1] = 1.0  # rank-one kernel
    spec = conv_spectrum(w, (4, 4))
    assert float(spec.sigma_min) == 0.0
    assert math.isinf(float(spec.condition_number))
    zero = conv_spectrum(torch.zeros(2, 2, 3, 3), (4, 4))
    assert float(zero.stable_rank) == 0.0 and float(zero.effective_rank) == 0.0


def test_dtypes_float32_default_float64_on_request():
    w = torch.randn(4, 4, 3, 3)
    spec = conv_spectrum(w, (8, 8))
    assert spec.sigma.dtype == torch.float32 and spec.method == "gram"
    sym, _ = conv_symbol(w, (8, 8))
    assert sym.dtype == torch.complex64
    spec64 = conv_spectrum(w, (8, 8), dtype=torch.float64)
    assert spec64.sigma.dtype == torch.float64 and spec64.method == "svd"
    torch.testing.assert_close(
        spec.values().double(), spec64.values(), rtol=1e-4, atol=2e-3 * float(spec64.sigma_max)
    )
    assert conv_spectrum(w.half(), (8, 8)).sigma.dtype == torch.float32
    assert conv_spectral_norm(w, (8, 8)).dtype == torch.float32 and conv_spectral_norm(w, (8, 8)).ndim == 0


@pytest.mark.parametrize(
    "co,ci,n,stride",
    [
        (128, 128, (8, 8), 1),
        (192, 192, (6, 6), 1),
        (128, 64, (8, 8), 2),
        (256, 128, (4, 6), 2),
        (96, 160, (6, 6), 1),
    ],
)
def test_spectral_norm_fast_path_matches_full_spectrum(co, ci, n, stride):
    """Block Lanczos on Gaussian kernels (smallest spectral gaps: the hard case) vs all singular values."""
    g = torch.Generator().manual_seed(co + ci)
    w = torch.randn(co, ci, 3, 3, generator=g) * math.sqrt(2 / (9 * co))
    exact = float(conv_spectrum(w.double(), n, stride=stride).sigma_max)
    for method in ("auto", "lanczos"):
        fast = float(conv_spectral_norm(w, n, stride=stride, method=method))
        assert abs(fast - exact) / exact <= 1e-3, (method, fast, exact)
        assert fast <= exact * (1 + 1e-5)  # Ritz values approach from below
    # a kernel with a dominant low-frequency component (typical of trained nets)
    w2 = w + 0.3 * torch.randn(co, ci, 1, 1, generator=g) / math.sqrt(ci)
    exact2 = float(conv_spectrum(w2.double(), n, stride=stride).sigma_max)
    assert float(conv_spectral_norm(w2, n, stride=stride, method="lanczos")) == pytest.approx(
        exact2, rel=1e-3
    )


def test_spectral_norm_1x1_and_lanczos_on_real_matrices():
    g = torch.Generator().manual_seed(7)
    w = torch.randn(300, 140, 1, 1, generator=g)
    exact = float(torch.linalg.matrix_norm(w[:, :, 0, 0].double(), 2))
    assert float(conv_spectral_norm(w, (7, 7))) == pytest.approx(exact, rel=1e-4)
    assert float(conv_spectral_norm(w, (14, 14), stride=2)) == pytest.approx(exact, rel=1e-4)
    assert float(conv_spectral_norm(w, (7, 7), method="exact")) == pytest.approx(exact, rel=1e-5)


def test_spectral_norm_is_deterministic_and_thread_independent():
    g = torch.Generator().manual_seed(8)
    w = torch.randn(128, 128, 3, 3, generator=g)
    a = conv_spectral_norm(w, (8, 8), seed=3)
    assert float(a) == float(conv_spectral_norm(w, (8, 8), seed=3))
    small = torch.randn(32, 16, 3, 3, generator=g)
    full = conv_spectrum(small, (8, 8))
    with spectral_config(parallel_linalg=False):
        serial = conv_spectrum(small, (8, 8))
    # float32 Gram route: equal up to its documented absolute floor ~sqrt(10 eps) sigma_max
    torch.testing.assert_close(serial.sigma, full.sigma, rtol=1e-5, atol=2e-3 * float(full.sigma_max))
    assert float(conv_spectral_norm(small, (8, 8))) == pytest.approx(float(full.sigma_max), rel=1e-5)


def test_singular_vectors_are_those_of_the_operator():
    torch.manual_seed(9)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    n = (8, 6)
    for stride in (1, 2):
        spec = conv_spectrum(w, n, stride=stride, compute_uv=True)
        assert spec.method == "svd" and spec.u is not None and spec.vh is not None
        M = explicit_conv_matrix(w, n, stride=stride).to(torch.complex128)
        half2 = spec.grid[1] // 2 + 1
        for f in (0, 3, spec.sigma.shape[0] - 1):
            J = divmod(f, half2)
            for k in (0, spec.sigma.shape[2] - 1):
                x = frequency_mode(spec.vh[f, 0, k].conj(), n, J, stride=stride).reshape(-1)
                assert float(x.norm()) == pytest.approx(1.0)
                y = M @ x
                sigma = float(spec.sigma[f, 0, k])
                assert float(y.norm()) == pytest.approx(sigma, rel=1e-9, abs=1e-12)
                # x is an eigenvector of K^T K
                torch.testing.assert_close(M.mH @ y, sigma**2 * x, rtol=1e-9, atol=1e-9)


def _sedghi_clip_numpy(w: np.ndarray, n: tuple[int, int], c: float) -> np.ndarray:
    """Clip_OperatorNorm of Sedghi et al. (2019), written from the formula: kernel layout (k, k, Cin, Cout)."""
    kernel = np.transpose(w, (2, 3, 1, 0))
    T = np.fft.fft2(kernel, n, axes=[0, 1])
    U, D, V = np.linalg.svd(T, full_matrices=False)
    T2 = np.matmul(U * np.minimum(D, c)[..., None, :], V)
    K2 = np.real(np.fft.ifft2(T2, axes=[0, 1]))[: w.shape[2], : w.shape[3]]
    return np.transpose(K2, (3, 2, 0, 1))


def test_clipping_one_pass_equals_sedghi_reference():
    torch.manual_seed(10)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    ours = clip_conv_operator_norm(w, (8, 8), 2.0)
    ref = _sedghi_clip_numpy(w.numpy(), (8, 8), 2.0)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("stride,dilation,groups", [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2)])
def test_clipping_reaches_max_norm_and_keeps_support(stride, dilation, groups):
    torch.manual_seed(11)
    w = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    n = (8, 8)
    kw = dict(stride=stride, dilation=dilation, groups=groups)
    before = float(conv_spectral_norm(w, n, **kw))
    one = clip_conv_operator_norm(w, n, 1.0, n_iter=1, **kw)
    many = clip_conv_operator_norm(w, n, 1.0, n_iter=40, **kw)
    after_one, after_many = float(conv_spectral_norm(one, n, **kw)), float(conv_spectral_norm(many, n, **kw))
    assert before > 3.0
    assert after_many <= 1.01 and after_many < after_one < before
    assert many.shape == w.shape and many.dtype == w.dtype
    # the result is a kernel of the same support: its periodic operator is the circular conv of `many`
    assert torch.linalg.svdvals(explicit_conv_matrix(many, n, **kw))[0] == pytest.approx(after_many)


def test_clipping_fixed_point_and_1x1_exact():
    torch.manual_seed(12)
    w = torch.randn(3, 3, 3, 3, dtype=torch.float64)
    norm = float(conv_spectral_norm(w, (6, 6)))
    torch.testing.assert_close(clip_conv_operator_norm(w, (6, 6), norm * 1.01), w)
    w1 = torch.randn(5, 3, 1, 1, dtype=torch.float64)
    c = clip_conv_operator_norm(w1, (4, 4), 0.5)
    sv = torch.linalg.svdvals(w1[:, :, 0, 0])
    torch.testing.assert_close(torch.linalg.svdvals(c[:, :, 0, 0]), sv.clamp(max=0.5))
    w32 = torch.randn(3, 3, 3, 3)
    assert clip_conv_operator_norm(w32, (6, 6), 0.1).dtype == torch.float32


def test_linear_and_modules():
    torch.manual_seed(13)
    lin = nn.Linear(7, 5)
    spec = linear_spectrum(lin.weight)
    torch.testing.assert_close(spec.values(), torch.linalg.svdvals(lin.weight.detach()))
    assert spec.count == 5 and float(spec.reshape_bound) == pytest.approx(float(spec.sigma_max))
    assert float(module_spectral_norm(lin)) == pytest.approx(float(spec.sigma_max), rel=1e-6)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, dilation=1)
    a = module_spectrum(conv, (8, 8)).values()
    b = conv_singular_values(conv.weight, (8, 8), stride=2, groups=2)
    torch.testing.assert_close(a, b)
    conv1d = nn.Conv1d(3, 4, 5, padding=2)
    assert module_spectrum(conv1d, (16,)).count == 3 * 16
    with pytest.raises(TypeError, match="BatchNorm2d is not supported"):
        module_spectrum(nn.BatchNorm2d(3), (4, 4))
    with pytest.raises(ValueError, match="input_size"):
        module_spectrum(conv)



def test_model_spectra_full_norm_and_nan_layers():
    """The per-layer loop of SpectralMonitor and `lightning-struct spectra`, against the single-layer ops."""
    torch.manual_seed(16)
    conv, lin, bad = nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Linear(6, 5), nn.Conv2d(4, 4, 3)
    with torch.no_grad():
        bad.weight[0, 0, 0, 0] = float("nan")
    layers = [("conv", conv), ("lin", lin), ("bad", bad)]
    sizes = {"conv": (8, 8), "bad": (4, 4)}
    full = model_spectra(layers, sizes, stats="full", method="svd")
    assert list(full) == ["conv", "lin", "bad"]
    spec = module_spectrum(conv, (8, 8), method="svd")
    assert full["conv"].stats == spec.stats() and list(full["conv"].stats) == list(SPECTRUM_STATS)
    torch.testing.assert_close(full["conv"].values, spec.values(), rtol=0, atol=0)
    assert (full["conv"].kind, full["conv"].weight_shape, full["conv"].input_size) == ("Conv2d", (4, 3, 3, 3), (8, 8))
    assert full["lin"].input_size == () and full["lin"].stats["sigma_max"] == pytest.approx(
        float(torch.linalg.matrix_norm(lin.weight.detach(), 2)), rel=1e-6
    )
    assert not full["bad"].finite and full["bad"].values is None
    assert set(full["bad"].stats) == set(SPECTRUM_STATS) and all(math.isnan(v) for v in full["bad"].stats.values())
    assert math.isnan(lipschitz_bound(full))
    norm = model_spectra(layers[:2], sizes, stats="norm")
    assert set(norm["conv"].stats) == {"sigma_max"} and norm["conv"].values is None
    assert norm["conv"].stats["sigma_max"] == float(module_spectral_norm(conv, (8, 8)))
    assert lipschitz_bound(norm) == norm["conv"].stats["sigma_max"] * norm["lin"].stats["sigma_max"]
    with pytest.raises(ValueError, match="model_spectra: stats='all'"):
        model_spectra(layers, sizes, stats="all")
    with pytest.raises(ValueError, match="conv: input_size"):
        model_spectra(layers[:1], {})
    with pytest.raises(TypeError, match="bn: BatchNorm2d is not supported"):
        model_spectra([("bn", nn.BatchNorm2d(3))], {"bn": (4, 4)})


def test_zero_padding_gap_shrinks_with_resolution():
    """Documented limitation: LFA is the periodic operator; zero padding differs, less so as n grows."""
    torch.manual_seed(14)
    w = torch.randn(3, 3, 3, 3, dtype=torch.float64)
    gaps = []
    for n in (4, 12):
        zero = np.linalg.norm(explicit_conv_matrix(w, (n, n), padding_mode="zeros").numpy(), 2)
        periodic = conv_spectral_norm(w, (n, n))
        gaps.append(abs(float(periodic - zero)) / float(periodic))
    assert gaps[1] < gaps[0]


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (
            dict(input_size=(7, 8), stride=2),
            ValueError,
            r"input_size\[0\]=7 is not divisible by stride\[0\]=2",
        ),
        (dict(input_size=(8, 8), groups=3), ValueError, "groups=3 does not divide C_out=4"),
        (dict(input_size=(8,)), ValueError, "input_size"),
        (dict(input_size=(8, 8), stride=0), ValueError, "stride"),
        (dict(input_size=(8, 0)), ValueError, "input_size"),
        (dict(input_size=(8, 8), dilation=(1, 1, 1)), ValueError, "dilation"),
        (dict(input_size=8.0), TypeError, "input_size"),
        (dict(input_size=(8, 8), groups=True), ValueError, "groups"),
    ],
)
def test_bad_arguments_raise(kwargs, exc, match):
    w = torch.randn(4, 2, 3, 3)
    with pytest.raises(exc, match=match):
        conv_singular_values(w, **kwargs)
    with pytest.raises(exc, match=match):
        conv_spectral_norm(w, **kwargs)


def test_bad_weights_and_options_raise():
    w = torch.randn(4, 2, 3, 3)
    with pytest.raises(ValueError, match="NaN or inf"):
        conv_spectrum(torch.full((2, 2, 3, 3), float("nan")), (4, 4))
    with pytest.raises(ValueError, match="NaN or inf"):
        conv_spectral_norm(torch.tensor([[[[float("inf")]]]]), (4, 4))
    with pytest.raises(TypeError, match="real floating-point"):
        conv_spectrum(w.to(torch.complex64), (4, 4))
    with pytest.raises(TypeError, match="real floating-point"):
        conv_spectrum(torch.ones(2, 2, 3, 3, dtype=torch.int64), (4, 4))
    with pytest.raises(ValueError, match="Conv1d/2d/3d"):
        conv_spectrum(torch.randn(4, 3), (4, 4))
    with pytest.raises(ValueError, match="method='qr'"):
        conv_spectrum(w, (4, 4), method="qr")
    with pytest.raises(ValueError, match="method='svd'"):
        conv_spectral_norm(w, (4, 4), method="svd")
    with pytest.raises(ValueError, match="dtype"):
        conv_spectrum(w, (4, 4), dtype=torch.float16)
    with pytest.raises(ValueError, match="max_norm"):
        clip_conv_operator_norm(w, (8, 8), 0.0)
    with pytest.raises(ValueError, match="n_iter"):
        clip_conv_operator_norm(w, (8, 8), 1.0, n_iter=0)
    with pytest.raises(ValueError, match="dilated kernel extent 5"):
        clip_conv_operator_norm(w, (4, 8), 1.0, dilation=2)
    with pytest.raises(ValueError, match="2-D"):
        linear_spectrum(torch.randn(2, 3, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    torch.manual_seed(15)
    w = torch.randn(16, 8, 3, 3)
    cpu = conv_spectrum(w, (8, 8), stride=2)
    gpu = conv_spectrum(w.cuda(), (8, 8), stride=2)
    assert gpu.sigma.is_cuda
    torch.testing.assert_close(gpu.values().cpu(), cpu.values(), rtol=1e-4, atol=1e-4)
    assert float(conv_spectral_norm(w.cuda(), (8, 8), stride=2)) == pytest.approx(
        float(cpu.sigma_max), rel=1e-3
    )
    clipped = clip_conv_operator_norm(w.cuda(), (8, 8), 1.0, n_iter=3)
    assert clipped.is_cuda
