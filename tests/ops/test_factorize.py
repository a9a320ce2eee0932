"""ops.factorize against brute-force references (explicit index loops, numpy SVD, heap greedy)."""

from __future__ import annotations

import heapq
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_struct.ops import factorize as fz

torch.manual_seed(0)

# (N, Cg, kh, kw, groups)
SHAPES = [
    (6, 4, 3, 3, 1),
    (8, 3, 3, 5, 1),
    (6, 2, 1, 3, 3),
    (4, 5, 2, 2, 2),
    (5, 7, 1, 1, 1),
    (4, 1, 3, 3, 4),
]


def _w(shape: tuple[int, ...]) -> torch.Tensor:
    n, cg, kh, kw, _ = shape
    return torch.randn(n, cg, kh, kw, dtype=torch.float64)


def _compose(scheme: str, factors: tuple[torch.Tensor, ...], groups: int) -> torch.Tensor:
    if scheme == "channel":
        return fz.compose_channel(*factors, groups=groups)
    if scheme == "spatial":
        return fz.compose_spatial(*factors, groups=groups)
    return fz.compose_tucker2(*factors, groups=groups)


def _factors(scheme: str, w: torch.Tensor, rank, groups: int):
    return {"channel": fz.channel_factors, "spatial": fz.spatial_factors, "tucker2": fz.tucker2_factors}[
        scheme
    ](w, rank, groups)


def _explicit_spatial_matrix(w: np.ndarray, g: int) -> np.ndarray:
    """M[(c,i),(j,n)] = w[n,c,i,j] per group, written with loops."""
    n, cg, kh, kw = w.shape
    ng = n // g
    m = np.zeros((g, cg * kh, kw * ng))
    for gi, nn_, c, i, j in itertools.product(range(g), range(ng), range(cg), range(kh), range(kw)):
        m[gi, c * kh + i, j * ng + nn_] = w[gi * ng + nn_, c, i, j]
    return m


@pytest.mark.parametrize("shape", SHAPES)
def test_spatial_matrix_matches_explicit_loops(shape):
    w = _w(shape)
    g = shape[-1]
    np.testing.assert_array_equal(
        fz.conv_matrix(w, "spatial", g).numpy(), _explicit_spatial_matrix(w.numpy(), g)
    )


@pytest.mark.parametrize("scheme", fz.CONV_SCHEMES)
@pytest.mark.parametrize("shape", SHAPES)
def test_full_rank_reconstructs_kernel(scheme, shape):
    w = _w(shape)
    g = shape[-1]
    full = fz.conv_full_rank(w.shape, scheme, g)
    rec = _compose(scheme, _factors(scheme, w, full, g), g)
    torch.testing.assert_close(rec, w, rtol=0, atol=1e-10)


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
@pytest.mark.parametrize("shape", SHAPES[:4])
def test_truncation_error_is_discarded_energy(scheme, shape):
    """Eckart-Young: ||w - w_r||_F^2 = sum of the discarded squared singular values (all groups)."""
    w = _w(shape)
    g = shape[-1]
    mats = fz.conv_matrix(w, scheme, g).numpy()
    s = np.stack([np.linalg.svd(m, compute_uv=False) for m in mats])  # numpy reference
    np.testing.assert_allclose(fz.conv_spectrum(w, scheme, g).numpy(), s, rtol=1e-10, atol=1e-12)
    for r in range(1, s.shape[1] + 1):
        rec = _compose(scheme, _factors(scheme, w, r, g), g)
        err = float(((w - rec) ** 2).sum())
        assert err == pytest.approx(float((s[:, r:] ** 2).sum()), rel=1e-9, abs=1e-10)


def test_linear_factors_eckart_young_and_full_rank():
    w = torch.randn(7, 5, dtype=torch.float64)
    s = np.linalg.svd(w.numpy(), compute_uv=False)
    for r in range(1, 6):
        first, second = fz.linear_factors(w, r)
        assert first.shape == (r, 5) and second.shape == (7, r)
        err = float(((w - fz.compose_linear(first, second)) ** 2).sum())
        assert err == pytest.approx(float((s[r:] ** 2).sum()), rel=1e-9, abs=1e-12)
    first, second = fz.linear_factors(w, 99)  # clipped to the full rank
    torch.testing.assert_close(fz.compose_linear(first, second), w, rtol=0, atol=1e-12)


def test_tucker2_core_is_the_hosvd_projection_and_error_within_bound():
    w = torch.randn(6, 5, 3, 3, dtype=torch.float64)
    wn = w.numpy()
    u_out = np.linalg.svd(wn.reshape(6, -1))[0][:, :3]
    u_in = np.linalg.svd(wn.transpose(1, 0, 2, 3).reshape(5, -1))[0][:, :2]
    core = np.einsum("nckl,no,ci->oikl", wn, u_out, u_in)
    ref = np.einsum("oikl,no,ci->nckl", core, u_out, u_in)
    first, core_t, last = fz.tucker2_factors(w, (2, 3))
    assert first.shape == (2, 5, 1, 1) and core_t.shape == (3, 2, 3, 3) and last.shape == (6, 3, 1, 1)
    rec = fz.compose_tucker2(first, core_t, last)
    np.testing.assert_allclose(rec.numpy(), ref, atol=1e-10)  # signs of U cancel in the product
    s_in, s_out = fz.conv_spectrum(w, "tucker2")
    bound = float((s_in[0, 2:] ** 2).sum() + (s_out[0, 3:] ** 2).sum())
    assert float(((w - rec) ** 2).sum()) <= bound + 1e-10


def test_factor_dtype_follows_weight_and_float32_full_rank_is_close():
    w = torch.randn(16, 8, 3, 3)
    first, second = fz.channel_factors(w, 16)
    assert first.dtype == torch.float32
    torch.testing.assert_close(fz.compose_channel(first, second), w, rtol=0, atol=1e-5)


def test_compose_is_autograd_safe():
    v = torch.randn(4, 3, 3, 1, dtype=torch.float64, requires_grad=True)
    h = torch.randn(6, 4, 1, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: fz.compose_spatial(a, b), (v, h))


# ----------------------------------------------------------------------------------------------
# rank rules
# ----------------------------------------------------------------------------------------------
def _energy_rank_loop(s: np.ndarray, e: float) -> int:
    s2 = s**2
    total = s2.sum()
    acc = 0.0
    for r, v in enumerate(s2, start=1):
        acc += v
        if acc / total >= e - 1e-12:
            return r
    return len(s)


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.floats(0.01, 10.0), min_size=1, max_size=12),
    st.floats(0.05, 0.999),
)
def test_energy_rank_matches_loop(values, energy):
    s = np.sort(np.asarray(values))[::-1].copy()
    r = fz.energy_rank(torch.tensor(s), energy)
    assert r == _energy_rank_loop(s, energy)
    frac = np.cumsum(s**2) / (s**2).sum()
    assert frac[r - 1] >= energy - 1e-12
    assert r == 1 or frac[r - 2] < energy


def test_energy_rank_groups_share_rank_and_edge_cases():
    s = torch.tensor([[3.0, 1.0, 0.0], [2.0, 2.0, 0.0]])  # total 18: r=1 keeps 13/18, r=2 all
    assert fz.energy_rank(s, 0.7) == 1
    assert fz.energy_rank(s, 0.73) == 2
    assert fz.energy_rank(s, 1.0) == 3
    assert fz.energy_rank(torch.zeros(4), 0.95) == 1  # no NaN for an all-zero weight
    with pytest.raises(ValueError, match="energy=1.5"):
        fz.energy_rank(s, 1.5)
    with pytest.raises(ValueError, match="energy=0"):
        fz.energy_rank(s, 0)


def test_ratio_rank():
    assert fz.ratio_rank(10, 0.25) == 3
    assert fz.ratio_rank(10, 0.3) == 3
    assert fz.ratio_rank(10, 0.01) == 1
    assert fz.ratio_rank(10, 1.0) == 10
    with pytest.raises(ValueError, match="ratio=0"):
        fz.ratio_rank(10, 0.0)


# ----------------------------------------------------------------------------------------------
# costs against the real factor layers
# ----------------------------------------------------------------------------------------------
GEOMS = [
    # (N, C, kh, kw, stride, padding, dilation, groups, in_hw)
    (8, 6, 3, 3, (1, 1), (1, 1), (1, 1), 1, (9, 9)),
    (8, 6, 3, 5, (2, 1), (1, 2), (1, 1), 2, (10, 11)),
    (6, 6, 3, 3, (2, 2), (0, 0), (2, 1), 3, (13, 12)),
    (4, 6, 3, 3, (1, 1), "same", (1, 1), 1, (7, 8)),
]


def _macs(w_shape, groups, x_hw, stride, padding, dilation) -> int:
    """MACs of F.conv2d counted from the real output size."""
    x = torch.zeros(1, w_shape[1] * groups, *x_hw)
    y = F.conv2d(x, torch.zeros(w_shape), None, stride, padding, dilation, groups)
    n, cg, kh, kw = w_shape
    return n * cg * kh * kw * y.shape[-2] * y.shape[-1]


@pytest.mark.parametrize("geom", GEOMS)
@pytest.mark.parametrize("scheme", fz.CONV_SCHEMES)
def test_flops_match_factor_layers(geom, scheme):
    n, c, kh, kw, stride, padding, dilation, g, hw = geom
    w = torch.randn(n, c // g, kh, kw)
    full = fz.conv_full_rank(w.shape, scheme, g)
    rank = min(2, full) if scheme != "tucker2" else (min(2, full[0]), min(3, full[1]))
    dense = fz.dense_conv_flops(w.shape, fz.conv_out_hw(hw, (kh, kw), stride, padding, dilation))
    assert dense == _macs(w.shape, g, hw, stride, padding, dilation)
    facs = _factors(scheme, w, rank, g)
    # replay the factor convs with their geometry and count each one's MACs
    if scheme == "channel":
        geo = [(stride, padding, dilation, g), ((1, 1), (0, 0), (1, 1), g)]
    elif scheme == "spatial":
        pv = padding if isinstance(padding, str) else (padding[0], 0)
        ph = padding if isinstance(padding, str) else (0, padding[1])
        geo = [((stride[0], 1), pv, (dilation[0], 1), g), ((1, stride[1]), ph, (1, dilation[1]), g)]
    else:
        geo = [((1, 1), (0, 0), (1, 1), g), (stride, padding, dilation, g), ((1, 1), (0, 0), (1, 1), g)]
    x = torch.zeros(1, c, *hw)
    total = 0
    for f, (s_, p_, d_, g_) in zip(facs, geo):
        y = F.conv2d(x, f, None, s_, p_, d_, g_)
        total += f[0].numel() * f.shape[0] * y.shape[-2] * y.shape[-1]
        x = y
    assert fz.conv_factor_flops(scheme, w.shape, rank, hw, g, stride, padding, dilation) == total
    params = sum(f.numel() for f in facs) + n
    assert fz.conv_factor_params(scheme, w.shape, rank, g, bias=True) == params


# ----------------------------------------------------------------------------------------------
# budget allocation
# ----------------------------------------------------------------------------------------------
def _heap_greedy(costs, values, budget, fixed=0.0):
    """One increment at a time: the best delta log(value) / delta cost that still fits."""
    chosen = [0] * len(costs)
    total = fixed + sum(c[0] for c in costs)
    heap = []
    for i, (c, v) in enumerate(zip(costs, values)):
        if len(c) > 1:
            heapq.heappush(heap, (-(math.log(v[1]) - math.log(v[0])) / (c[1] - c[0]), i))
    while heap:
        _, i = heapq.heappop(heap)
        t = chosen[i]
        dc = costs[i][t + 1] - costs[i][t]
        if total + dc > budget + 1e-9 * max(1.0, abs(budget)):  # same float tolerance as allocate_budget
            break
        total += dc
        chosen[i] = t + 1
        if t + 2 < len(costs[i]):
            c, v = costs[i], values[i]
            heapq.heappush(heap, (-(math.log(v[t + 2]) - math.log(v[t + 1])) / (c[t + 2] - c[t + 1]), i))
    return chosen


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.1, 1.0))
def test_budget_matches_heap_greedy_on_matrix_spectra(seed, frac):
    gen = torch.Generator().manual_seed(seed)
    costs, values = [], []
    for _ in range(4):
        m = int(torch.randint(2, 9, (1,), generator=gen))
        s = torch.sort(torch.rand(m, generator=gen, dtype=torch.float64) + 0.01, descending=True).values
        per_rank = float(torch.randint(3, 20, (1,), generator=gen))
        costs.append([per_rank * r for r in range(1, m + 1)])
        values.append(fz.retained_energy(s).tolist())
    lo = sum(c[0] for c in costs)
    hi = sum(c[-1] for c in costs)
    budget = lo + frac * (hi - lo)
    got = fz.allocate_budget([torch.tensor(c) for c in costs], [torch.tensor(v) for v in values], budget)
    assert got == _heap_greedy(costs, values, budget)
    assert sum(c[t] for c, t in zip(costs, got)) <= budget * (1 + 1e-9)


def test_budget_errors_and_edges():
    costs = [torch.tensor([10.0, 20.0]), torch.tensor([5.0])]
    values = [torch.tensor([0.5, 1.0]), torch.tensor([1.0])]
    assert fz.allocate_budget(costs, values, 100.0) == [1, 0]
    assert fz.allocate_budget(costs, values, 15.0) == [0, 0]
    with pytest.raises(ValueError, match="smallest achievable cost 25"):
        fz.allocate_budget(costs, values, 20.0, fixed_cost=10.0)
    assert fz.allocate_budget([], [], 1.0) == []


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="scheme='cp'"):
        fz.check_scheme("cp")
    with pytest.raises(ValueError, match="divisible by groups=4"):
        fz.channel_factors(torch.randn(6, 2, 3, 3), 1, groups=4)
    with pytest.raises(ValueError, match="rank=0"):
        fz.channel_factors(torch.randn(6, 2, 3, 3), 0)
    with pytest.raises(ValueError, match="shape"):
        fz.linear_factors(torch.randn(3, 3, 3), 1)


@pytest.mark.parametrize("rows,cols", [(6, 20), (20, 6)])
def test_svd_split_rank_deficient_and_tall_wide(rows, cols):
    """Zero singular values must not produce NaN/inf, full rank stays exact, both orientations."""
    m = torch.randn(rows, 2, dtype=torch.float64) @ torch.randn(2, cols, dtype=torch.float64)
    m = torch.cat([m, torch.zeros(1, cols, dtype=torch.float64)])  # an all-zero row as well
    a, b = fz.svd_split(m, 99)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    torch.testing.assert_close(a @ b, m, rtol=0, atol=1e-12)
    a2, b2 = fz.svd_split(m, 2)
    torch.testing.assert_close(a2 @ b2, m, rtol=0, atol=1e-10)
    # balanced split: both factors carry sqrt(S)
    s = np.linalg.svd(m.numpy(), compute_uv=False)[:2]
    np.testing.assert_allclose(torch.linalg.norm(a2, dim=0).numpy(), np.sqrt(s), rtol=1e-8)
    np.testing.assert_allclose(torch.linalg.norm(b2, dim=1).numpy(), np.sqrt(s), rtol=1e-8)
    w = torch.zeros(4, 3, 3, 3)
    first, second = fz.channel_factors(w, 2)
    assert torch.isfinite(first).all() and float(fz.compose_channel(first, second).abs().max()) == 0.0
