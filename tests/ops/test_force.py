"""Force regularization ops against brute-force references (pairwise loops, autograd, numpy SVD)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from lightning_struct.ops.force import (
    add_force_,
    filter_rank,
    filter_ranks,
    force_energy,
    force_gradient,
    max_filter_rank,
    mean_pairwise_cosine,
    weights_overflow_safe,
)

ZERO = 1e-4  # the authors' ZERO_THRESHOLD, the default eps_norm
EPS_DIST64 = 1e-4


# ------------------------------------------------------------------------------------------
# brute-force references: explicit loops over filters and pairs, numpy float64
# ------------------------------------------------------------------------------------------
def loop_force(weight: torch.Tensor, kind: str, scale: str, groups: int = 1) -> np.ndarray:
    """The Caffe solver's per-pair loop, written out: filters of norm <= 1e-4 are skipped, and
    for L1 pairs at distance <= 1e-4 as well."""
    w = weight.detach().double().numpy().reshape(weight.shape[0], -1)
    n_all, _ = w.shape
    ng = n_all // groups
    out = np.zeros_like(w)
    for g in range(groups):
        for i in range(g * ng, (g + 1) * ng):
            ri = np.linalg.norm(w[i])
            if ri <= ZERO:
                continue
            ni = w[i] / ri
            t = np.zeros_like(ni)
            for j in range(g * ng, (g + 1) * ng):
                if j == i:
                    continue
                rj = np.linalg.norm(w[j])
                if rj <= ZERO:
                    continue
                nj = w[j] / rj
                diff = ni - nj
                dist = np.linalg.norm(diff)
                if kind == "l2":
                    t += diff
                else:
                    if dist <= EPS_DIST64:
                        continue
                    t += diff / dist
            t_perp = t - np.dot(ni, t) * ni
            out[i] = ri * t_perp if scale == "authors" else t_perp / ri
    return out.reshape(weight.shape)


def loop_energy(weight: torch.Tensor, kind: str, groups: int = 1) -> torch.Tensor:
    """The energy as an explicit autograd-able pairwise sum (no zero guard: tests use non-zero filters)."""
    f = weight.reshape(weight.shape[0], -1)
    n = f / f.norm(dim=1, keepdim=True)
    ng = f.shape[0] // groups
    e = weight.new_zeros(())
    for g in range(groups):
        for i in range(g * ng, (g + 1) * ng):
            for j in range(i + 1, (g + 1) * ng):
                d = n[i] - n[j]
                e = e + (0.5 * (d * d).sum() if kind == "l2" else torch.sqrt((d * d).sum()))
    return e


def numpy_rank(weight: torch.Tensor, energy: float, groups: int = 1) -> int:
    w = weight.detach().double().numpy().reshape(weight.shape[0], -1)
    ng = w.shape[0] // groups
    total_rank = 0
    for g in range(groups):
        s2 = np.linalg.svd(w[g * ng : (g + 1) * ng], compute_uv=False) ** 2
        total = s2.sum()
        if total == 0:
            continue
        for r in range(1, len(s2) + 1):
            if s2[:r].sum() >= energy * total:
                total_rank += r
                break
    return total_rank


def rand_weight(shape: tuple[int, ...], seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


SHAPES = [(5, 3, 3, 3), (7, 4), (4, 2, 3), (6, 2, 1, 2, 2)]


# ------------------------------------------------------------------------------------------
# closed forms vs loops, autograd
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["l2", "l1"])
@pytest.mark.parametrize("scale", ["authors", "gradient"])
@pytest.mark.parametrize("shape", SHAPES)
def test_closed_form_equals_pairwise_loop(kind: str, scale: str, shape: tuple[int, ...]) -> None:
    w = rand_weight(shape, seed=len(shape))
    got = force_gradient(w, kind, scale).numpy()
    np.testing.assert_allclose(got, loop_force(w, kind, scale), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["l2", "l1"])
@pytest.mark.parametrize("groups", [1, 2, 3])
def test_gradient_scale_equals_autograd_of_energy(kind: str, groups: int) -> None:
    w = rand_weight((6, 2, 3, 3), seed=groups).requires_grad_(True)
    energy = loop_energy(w, kind, groups)
    (expected,) = torch.autograd.grad(energy, w)
    got = force_gradient(w, kind, "gradient", groups)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(force_energy(w, kind, groups), energy.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["l2", "l1"])
def test_authors_scale_is_norm_squared_times_gradient(kind: str) -> None:
    w = rand_weight((8, 3, 3, 3), seed=3) * torch.linspace(0.2, 3.0, 8, dtype=torch.float64).view(8, 1, 1, 1)
    w.requires_grad_(True)
    (grad,) = torch.autograd.grad(loop_energy(w, kind), w)
    r2 = w.detach().reshape(8, -1).pow(2).sum(1).view(8, 1, 1, 1)
    torch.testing.assert_close(force_gradient(w, kind, "authors"), r2 * grad, rtol=1e-10, atol=1e-12)
    # and it really differs from the exact gradient when norms differ from 1
    assert not torch.allclose(force_gradient(w, kind, "authors"), grad, atol=1e-3)


@pytest.mark.parametrize("kind", ["l2", "l1"])
def test_force_is_tangential(kind: str) -> None:
    w = rand_weight((9, 4, 3, 3), seed=5)
    f = force_gradient(w, kind).reshape(9, -1)
    radial = (f * w.reshape(9, -1)).sum(1)
    torch.testing.assert_close(radial, torch.zeros(9, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", ["l2", "l1"])
def test_small_step_against_force_lowers_energy(kind: str) -> None:
    w = rand_weight((10, 3, 3, 3), seed=11)
    e0 = force_energy(w, kind)
    e1 = force_energy(w - 1e-3 * force_gradient(w, kind), kind)
    assert e1 < e0


# ------------------------------------------------------------------------------------------
# groups
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["l2", "l1"])
@pytest.mark.parametrize("scale", ["authors", "gradient"])
def test_grouped_equals_per_group_calls(kind: str, scale: str) -> None:
    w = rand_weight((12, 2, 3, 3), seed=7)
    got = force_gradient(w, kind, scale, groups=3)
    expected = torch.cat([force_gradient(w[i * 4 : (i + 1) * 4], kind, scale) for i in range(3)])
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(got.numpy(), loop_force(w, kind, scale, groups=3), rtol=1e-10, atol=1e-12)
    # filters in other groups do not pull: the ungrouped force is different
    assert not torch.allclose(got, force_gradient(w, kind, scale, groups=1))


def test_grouped_metrics() -> None:
    w = rand_weight((8, 2, 2, 2), seed=1)
    assert filter_rank(w, 0.95, groups=2) == numpy_rank(w, 0.95, groups=2)
    assert max_filter_rank(w, groups=2) == 8
    assert max_filter_rank(torch.zeros(64, 3, 1, 1)) == 3
    # per-group cosine: two groups of identical filters, the groups orthogonal
    a = torch.tensor([1.0, 0.0], dtype=torch.float64)
    b = torch.tensor([0.0, 1.0], dtype=torch.float64)
    w2 = torch.stack([a, 2 * a, b, 3 * b])
    assert mean_pairwise_cosine(w2, groups=2) == pytest.approx(1.0)
    assert mean_pairwise_cosine(w2, groups=1) == pytest.approx(2 / 6)


# ------------------------------------------------------------------------------------------
# guards: zero filters, coincident filters, low precision
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["l2", "l1"])
@pytest.mark.parametrize("scale", ["authors", "gradient"])
def test_zero_filters_are_left_out(kind: str, scale: str) -> None:
    w = rand_weight((6, 3, 3), seed=2)
    w[2] = 0.0
    w[4] = 1e-6  # below the zero threshold
    f = force_gradient(w, kind, scale)
    assert torch.isfinite(f).all()
    assert f[2].abs().max() == 0 and f[4].abs().max() == 0
    keep = [0, 1, 3, 5]
    torch.testing.assert_close(f[keep], force_gradient(w[keep], kind, scale), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(f.numpy(), loop_force(w, kind, scale), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["l2", "l1"])
@pytest.mark.parametrize("scale", ["authors", "gradient"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_degenerate_inputs_are_finite(kind: str, scale: str, dtype: torch.dtype) -> None:
    cases = {
        "all zero": torch.zeros(5, 3, 3, 3),
        "identical": rand_weight((1, 3, 3, 3)).repeat(5, 1, 1, 1),
        "scaled copies": rand_weight((1, 8)) * torch.arange(1, 6).view(5, 1),
        "antipodal": torch.cat([rand_weight((1, 8)), -rand_weight((1, 8))]),
        "one filter": rand_weight((1, 4, 3, 3)),
        "tiny norms": rand_weight((4, 6)) * 1e-30,
        "huge norms": rand_weight((4, 6)) * 1e30 if dtype != torch.float16 else rand_weight((4, 6)) * 1e4,
    }
    for name, w in cases.items():
        w = w.to(dtype)
        f = force_gradient(w, kind, scale)
        assert f.dtype == dtype and f.shape == w.shape, name
        assert torch.isfinite(f).all(), f"{name}: non-finite force"
        assert math.isfinite(float(force_energy(w, kind))), name
        assert math.isfinite(mean_pairwise_cosine(w)), name
        g = torch.zeros_like(w)
        add_force_(g, w, 0.1, kind, scale)
        assert torch.isfinite(g).all(), name


@pytest.mark.parametrize("kind", ["l2", "l1"])
def test_identical_filters_feel_no_force(kind: str) -> None:
    w = rand_weight((1, 3, 3, 3)).repeat(5, 1, 1, 1) * torch.arange(1.0, 6.0, dtype=torch.float64).view(
        5, 1, 1, 1
    )
    torch.testing.assert_close(force_gradient(w, kind), torch.zeros_like(w), atol=1e-12, rtol=0)


def test_l1_coincident_pairs_exert_no_force() -> None:
    a, b = rand_weight((2, 10), seed=4)
    w = torch.stack([a, 2 * a, b])  # filters 0 and 1 point the same way
    f = force_gradient(w, "l1", "gradient")
    np.testing.assert_allclose(f.numpy(), loop_force(w, "l1", "gradient"), rtol=1e-10, atol=1e-12)
    # filter 0 is pulled by b only: the unit pull, projected, over ||a||
    na, nb = a / a.norm(), b / b.norm()
    t = (na - nb) / (na - nb).norm()
    expected0 = (t - (t @ na) * na) / a.norm()
    torch.testing.assert_close(f[0], expected0, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["l2", "l1"])
def test_float32_close_to_float64(kind: str) -> None:
    w = rand_weight((16, 8, 3, 3), seed=9)
    f64 = force_gradient(w, kind)
    f32 = force_gradient(w.float(), kind)
    assert f32.dtype == torch.float32
    torch.testing.assert_close(f32.double(), f64, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------
# in-place add
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["l2", "l1"])
@pytest.mark.parametrize("scale", ["authors", "gradient"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "float32"])
def test_add_force_in_place(kind: str, scale: str, layout: str) -> None:
    w = rand_weight((8, 4, 3, 3), seed=12)
    g0 = rand_weight((8, 4, 3, 3), seed=13)
    if layout == "channels_last":
        w = w.contiguous(memory_format=torch.channels_last)
        g0 = g0.contiguous(memory_format=torch.channels_last)
    if layout == "float32":
        w, g0 = w.float(), g0.float()
    g = g0.clone()
    out = add_force_(g, w, 0.3, kind, scale, groups=2)
    assert out is g
    expected = g0 + 0.3 * force_gradient(w, kind, scale, groups=2)
    tol = 1e-12 if g.dtype == torch.float64 else 1e-5
    torch.testing.assert_close(g, expected, rtol=tol, atol=tol)
    g2 = g0.clone()
    add_force_(g2, w, 0.0, kind, scale)
    assert torch.equal(g2, g0)


# ------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(6, 3, 3, 3), (40, 2, 2, 2), (8, 5), (3, 50)])
@pytest.mark.parametrize("energy", [0.5, 0.9, 0.95, 0.99, 1.0])
def test_filter_rank_against_numpy_svd(shape: tuple[int, ...], energy: float) -> None:
    # decaying spectrum so the ranks are spread out
    g = torch.Generator().manual_seed(sum(shape))
    n, d = shape[0], int(np.prod(shape[1:]))
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    k = min(n, d)
    s = torch.logspace(0, -2, k, dtype=torch.float64)
    w = (u[:, :k] * s) @ v[:, :k].T
    w = w.reshape(shape)
    assert filter_rank(w, energy) == numpy_rank(w, energy)
    assert filter_rank(w.float(), energy) == numpy_rank(w, energy)  # float32 path (monitoring)


def test_filter_rank_structured_cases() -> None:
    assert filter_rank(torch.zeros(4, 3, 3, 3)) == 0
    a = rand_weight((1, 27))
    assert filter_rank(a.repeat(6, 1) * torch.arange(1.0, 7.0, dtype=torch.float64).view(6, 1)) == 1
    eye = torch.eye(20, dtype=torch.float64)  # 20 equal singular values
    assert filter_rank(eye, 0.95) == 19
    assert filter_rank(eye, 1.0) == 20
    assert filter_rank(eye, 0.05) == 1
    assert filter_ranks(eye, [0.5, 0.95, 1.0]) == [10, 19, 20]
    assert filter_rank(eye.float(), 0.95) == 19
    assert filter_rank(eye.to(torch.bfloat16), 0.95) == 19


def test_mean_pairwise_cosine_and_energy_against_loops() -> None:
    w = rand_weight((7, 3, 2, 2), seed=21)
    f = w.reshape(7, -1)
    n = f / f.norm(dim=1, keepdim=True)
    cos = [float(n[i] @ n[j]) for i in range(7) for j in range(i + 1, 7)]
    assert mean_pairwise_cosine(w) == pytest.approx(sum(cos) / len(cos), abs=1e-12)
    assert mean_pairwise_cosine(torch.zeros(3, 4)) == 0.0
    assert mean_pairwise_cosine(rand_weight((1, 4))) == 0.0
    for kind in ("l2", "l1"):
        assert float(force_energy(w, kind)) == pytest.approx(float(loop_energy(w, kind)), rel=1e-12)


# ------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------
def test_bad_arguments() -> None:
    w = rand_weight((4, 3, 3, 3))
    with pytest.raises(ValueError, match="kind='l3'"):
        force_gradient(w, "l3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scale='caffe'"):
        force_gradient(w, "l2", "caffe")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 2 dims"):
        force_gradient(torch.randn(5))
    with pytest.raises(ValueError, match="not divisible by groups=3"):
        force_gradient(w, groups=3)
    with pytest.raises(ValueError, match="groups=0 must be an int >= 1"):
        force_gradient(w, groups=0)
    with pytest.raises(TypeError, match="torch.Tensor"):
        force_gradient(np.zeros((3, 3)))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eps_norm"):
        force_gradient(w, eps_norm=-1.0)
    with pytest.raises(ValueError, match=r"energy=0.0 must be a number > 0 and <= 1"):
        filter_rank(w, 0.0)
    with pytest.raises(ValueError, match=r"energy=1.5 must be a number > 0 and <= 1"):
        filter_rank(w, 1.5)
    with pytest.raises(ValueError, match="energies must not be empty"):
        filter_ranks(w, [])
    with pytest.raises(ValueError, match="grad shape"):
        add_force_(torch.zeros(4, 27), w, 1.0)


# ------------------------------------------------------------------------------------------
# property test over shapes
# ------------------------------------------------------------------------------------------
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    groups=st.integers(1, 3),
    per_group=st.integers(1, 5),
    tail=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    kind=st.sampled_from(["l2", "l1"]),
    scale=st.sampled_from(["authors", "gradient"]),
    seed=st.integers(0, 2**16),
    energy=st.sampled_from([0.5, 0.8, 0.95, 0.99]),
)
# a draw with two nearly coincident 2-D filters (Gram-route cancellation), once found by hypothesis
@example(groups=3, per_group=3, tail=[2], kind="l1", scale="authors", seed=3, energy=0.5)
def test_property_random_shapes(
    groups: int, per_group: int, tail: list[int], kind: str, scale: str, seed: int, energy: float
) -> None:
    shape = (groups * per_group, *tail)
    w = rand_weight(shape, seed=seed)
    f = force_gradient(w, kind, scale, groups)
    assert f.shape == w.shape
    rtol = 1e-9
    if kind == "l1":
        # the closed form gets d_ij = sqrt(2 - 2 n_i.n_j) from the Gram matrix: the cosine's rounding
        # (~1e-16) becomes a relative error ~1e-16 / d^2 in the pair term, so close pairs need room
        n = w.reshape(groups, per_group, -1)
        n = n / n.norm(dim=-1, keepdim=True)
        d = torch.cdist(n, n)
        d = d[d > 1e-4]  # coincident pairs exert no force (the guard), in the op and in the loop
        if d.numel():
            rtol = max(rtol, 1e-14 / float(d.min()) ** 2)
    np.testing.assert_allclose(f.numpy(), loop_force(w, kind, scale, groups), rtol=rtol, atol=1e-11)
    # rank: skip draws whose cumulative energy sits on the threshold (ties are float noise)
    flat = w.reshape(groups, per_group, -1)
    for g in range(groups):
        s2 = np.linalg.svd(flat[g].numpy(), compute_uv=False) ** 2
        frac = np.cumsum(s2) / s2.sum()
        assume(np.min(np.abs(frac - energy)) > 1e-9)
    assert filter_rank(w, energy, groups) == numpy_rank(w, energy, groups)
    assert 1 <= filter_rank(w, energy, groups) <= max_filter_rank(w, groups)


@pytest.mark.parametrize("kind", ["l2", "l1"])
@pytest.mark.parametrize("scale", ["authors", "gradient"])
def test_homogeneity_and_overflow_rescaling(kind: str, scale: str) -> None:
    w = rand_weight((6, 2, 3, 3), seed=31)
    base = force_gradient(w, kind, scale)
    power = 1 if scale == "authors" else -1
    for c, dtype in [(1e200, torch.float64), (1e25, torch.float32), (3.0, torch.float64)]:
        # 1e200 / 1e25 overflow squared norms: the rescaled path must give the exact answer
        got = force_gradient((w * c).to(dtype), kind, scale).double()
        torch.testing.assert_close(
            got / c**power, base, rtol=1e-4 if dtype == torch.float32 else 1e-10, atol=0
        )
        assert float(force_energy((w * c).to(dtype), kind)) == pytest.approx(
            float(force_energy(w, kind)), rel=1e-4
        )
        g = torch.zeros_like(w, dtype=dtype)
        add_force_(g, (w * c).to(dtype), 2.0, kind, scale)
        torch.testing.assert_close(
            g.double() / c**power, 2 * base, rtol=1e-4 if dtype == torch.float32 else 1e-10, atol=0
        )


def test_batched_overflow_check_and_unchecked_path() -> None:
    ws = [rand_weight((8, 3, 3, 3), seed=1).float(), rand_weight((5, 7), seed=2).float(), torch.zeros(0, 3)]
    assert weights_overflow_safe(ws) and weights_overflow_safe([])
    assert not weights_overflow_safe([ws[0], ws[1] * 1e19])  # squared norms overflow float32
    assert not weights_overflow_safe([rand_weight((4, 4)) * 1e160])  # ... and float64
    assert weights_overflow_safe([rand_weight((4, 4)).to(torch.bfloat16) * 1e15])  # bf16 runs in float32
    for kind in ("l2", "l1"):
        g1, g2 = torch.zeros_like(ws[0]), torch.zeros_like(ws[0])
        add_force_(g1, ws[0], 0.5, kind)
        add_force_(g2, ws[0], 0.5, kind, check_overflow=False)
        assert torch.equal(g1, g2)


def test_symmetric_gram_by_block_rows_equals_the_full_product_and_l1_force_is_unchanged(monkeypatch):
    """The Gram of the L1 force from the upper block rows only (5/8 of the multiply-adds) is the
    full product, and the force computed through it equals the one through a plain bmm."""
    from lightning_struct.ops import force as F
    from lightning_struct.ops.linalg import symmetric_gram

    torch.manual_seed(0)
    for shape, groups in (((300, 17), 1), ((600, 8, 3, 3), 2), ((257, 9), 1)):
        w = torch.randn(*shape, dtype=torch.float64)
        m = F.filter_matrix(w, groups)
        torch.testing.assert_close(symmetric_gram(m, [0, 100, 150, m.shape[1]]), m @ m.mT, rtol=1e-12, atol=1e-12)
        blocked = F.force_gradient(w, "l1", "gradient", groups)
        monkeypatch.setattr(F, "GRAM_BLOCKS_FROM", 10**9)
        plain = F.force_gradient(w, "l1", "gradient", groups)
        monkeypatch.undo()
        torch.testing.assert_close(blocked, plain, rtol=1e-10, atol=1e-12)
