"""Heavy-tailed ESD metrics against brute-force references (closed-form MLE, a plain loop over the
xmin candidates, numpy float64) and, where installed, WeightWatcher's own fit."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from lightning_struct.ops.esd import EPS_FLOAT32, PowerLawFit, esd_stats, powerlaw_fit

ALPHAS = (2.5, 3.5, 5.0)


def pareto(alpha: float, n: int, seed: int, xm: float = 1.0) -> np.ndarray:
    """``n`` samples of the continuous power law ``p(x) ~ x^-alpha`` on ``[xm, inf)`` (inverse CDF)."""
    u = np.random.default_rng(seed).random(n)
    return xm * (1.0 - u) ** (-1.0 / (alpha - 1.0))


def body_and_tail(n: int, seed: int) -> np.ndarray:
    """A lognormal body below a Pareto tail: a data set with a non-trivial best xmin."""
    rng = np.random.default_rng(seed)
    body = np.exp(rng.normal(0.0, 0.5, n // 2))
    tail = 2.0 * (1.0 - rng.random(n - n // 2)) ** (-1.0 / 2.0)
    return np.concatenate([body, tail])


# ------------------------------------------------------------------------------------------
# brute-force references
# ------------------------------------------------------------------------------------------
def mle_plain(x: np.ndarray, xmin: float) -> tuple[float, float, int]:
    """alpha = 1 + m / sum log(x/xmin) over x >= xmin, and the KS distance, in plain float64."""
    tail = np.sort(np.asarray(x, dtype=np.float64)[np.asarray(x) >= xmin])
    m = tail.size
    alpha = 1.0 + m / float(np.sum(np.log(tail / xmin)))
    d = 0.0
    for k, v in enumerate(tail):
        d = max(d, abs(1.0 - (v / xmin) ** (1.0 - alpha) - k / m))
    return alpha, d, m


def search_loop(x: np.ndarray, min_tail: int) -> tuple[float, float, float]:
    """Every distinct value leaving >= min_tail values as xmin; the one of least KS distance
    (the first on ties). Returns (alpha, xmin, D)."""
    x = np.sort(np.asarray(x, dtype=np.float64))
    best = (math.inf, math.nan, math.nan)  # (D, xmin, alpha)
    for xmin in np.unique(x):
        tail = x[x >= xmin]
        if tail.size < min_tail or tail[-1] == xmin:
            continue
        alpha, d, _ = mle_plain(x, float(xmin))
        if d < best[0]:
            best = (d, float(xmin), alpha)
    return best[2], best[1], best[0]


# ------------------------------------------------------------------------------------------
# the fit
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", ALPHAS)
def test_fixed_xmin_is_the_closed_form_mle(alpha: float) -> None:
    x = pareto(alpha, 3000, seed=int(alpha * 10))
    for xmin in (1.0, float(np.quantile(x, 0.3)), 1.7):
        fit = powerlaw_fit(torch.from_numpy(x), xmin=xmin)
        ref_alpha, ref_d, m = mle_plain(x, xmin)
        assert fit.xmin == xmin and fit.n_tail == m and fit.n == x.size and fit.n_excluded == 0
        assert fit.alpha == pytest.approx(ref_alpha, rel=1e-12)
        assert fit.ks_distance == pytest.approx(ref_d, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_search_recovers_the_true_alpha(alpha: float) -> None:
    """xmin searched on 3000 samples of a pure power law: within 4 standard errors
    ``(alpha - 1)/sqrt(n_tail)`` of the truth (about 0.1, 0.17, 0.27 for 2.5, 3.5, 5)."""
    x = pareto(alpha, 3000, seed=int(alpha * 10))
    fit = powerlaw_fit(x)
    assert fit.n_tail >= 0.5 * x.size
    assert abs(fit.alpha - alpha) < 4.0 * (alpha - 1.0) / math.sqrt(fit.n_tail)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(lambda: body_and_tail(400, 1), id="body+tail"),
        pytest.param(lambda: pareto(3.0, 300, 2), id="pareto"),
        pytest.param(lambda: np.round(body_and_tail(400, 3), 1), id="ties"),
    ],
)
@pytest.mark.parametrize("ks_points", [2, 7, 2048])
def test_search_equals_a_loop_over_candidates(data, ks_points: int) -> None:
    """Every candidate (max_candidates=None) and the default cap (above n here): the chosen
    xmin, its alpha and exact KS distance are the loop's, even with a coarse first KS pass."""
    x = data()
    ref_alpha, ref_xmin, ref_d = search_loop(x, min_tail=10)
    for cap in (None, 1000):
        fit = powerlaw_fit(x, min_tail=10, max_candidates=cap, ks_points=ks_points)
        assert fit.xmin == ref_xmin
        assert fit.alpha == pytest.approx(ref_alpha, rel=1e-12)
        assert fit.ks_distance == pytest.approx(ref_d, rel=1e-9, abs=1e-12)
        assert fit.n_tail == int(np.sum(x >= ref_xmin))


def test_candidate_cap_searches_rank_spaced_values() -> None:
    x = body_and_tail(5000, 4)
    capped = powerlaw_fit(x, max_candidates=50)
    full = powerlaw_fit(x, max_candidates=None)
    assert capped.xmin in set(np.sort(x)[np.round(np.linspace(0, x.size - 10, 50)).astype(int)])
    assert capped.ks_distance >= full.ks_distance - 1e-15
    assert capped.alpha == pytest.approx(full.alpha, rel=0.05)


# ------------------------------------------------------------------------------------------
# edge cases
# ------------------------------------------------------------------------------------------
def is_nan_fit(fit: PowerLawFit) -> bool:
    return math.isnan(fit.alpha) and math.isnan(fit.ks_distance)


def test_too_few_or_degenerate_values_give_nan() -> None:
    assert is_nan_fit(powerlaw_fit(torch.arange(1.0, 10.0)))  # 9 < min_tail
    assert not is_nan_fit(powerlaw_fit(torch.arange(1.0, 11.0)))
    assert is_nan_fit(powerlaw_fit(torch.ones(100)))  # a tail of equal values
    assert is_nan_fit(powerlaw_fit(torch.empty(0)))
    fit = powerlaw_fit(torch.arange(1.0, 101.0), xmin=95.0)  # 6 values in the tail
    assert is_nan_fit(fit) and fit.n_tail == 6 and fit.xmin == 95.0


def test_non_positive_and_non_finite_values_are_excluded_and_counted() -> None:
    x = body_and_tail(400, 5)
    dirty = np.concatenate([x, [0.0, -1.0, np.inf, np.nan, 0.0]])
    a, b = powerlaw_fit(dirty), powerlaw_fit(x)
    assert a.n_excluded == 5 and a.n == x.size
    assert (a.alpha, a.xmin, a.ks_distance, a.n_tail) == (b.alpha, b.xmin, b.ks_distance, b.n_tail)


def test_all_zero_spectrum() -> None:
    out = esd_stats(torch.zeros(64))
    assert out["n_zero"] == 64 and out["n_values"] == 64 and out["n_tail"] == 0
    assert math.isnan(out["alpha"]) and math.isnan(out["alpha_weighted"])
    assert out["log_spectral_norm"] == -math.inf


def test_zeros_are_counted_and_excluded_from_the_fit() -> None:
    sigma = np.sqrt(body_and_tail(400, 6))
    tiny = sigma.max() * 1e-9  # numerically zero: below sigma_max * n * eps32
    spectrum = np.concatenate([sigma, np.zeros(30), np.full(5, tiny)])
    out = esd_stats(torch.from_numpy(spectrum))
    fit = powerlaw_fit(sigma**2)
    assert out["n_zero"] == 35 and out["n_values"] == spectrum.size
    assert out["alpha"] == fit.alpha and out["xmin"] == fit.xmin and out["ks_distance"] == fit.ks_distance
    lam_max = float(sigma.max()) ** 2
    assert out["log_spectral_norm"] == pytest.approx(math.log10(lam_max), rel=1e-14)
    assert out["alpha_weighted"] == pytest.approx(fit.alpha * math.log10(lam_max), rel=1e-14)
    # the tolerance is sigma_max * matrix_dim * eps32
    edge = sigma.max() * 1000 * EPS_FLOAT32
    out = esd_stats(np.concatenate([sigma, [0.99 * edge, 1.01 * edge]]), matrix_dim=1000)
    assert out["n_zero"] == 1


def test_too_few_singular_values() -> None:
    out = esd_stats(torch.tensor([3.0, 2.0, 1.0, 0.5]))
    assert math.isnan(out["alpha"]) and math.isnan(out["alpha_weighted"]) and math.isnan(out["xmin"])
    assert out["log_spectral_norm"] == pytest.approx(math.log10(9.0))
    assert out["n_zero"] == 0


def test_float32_and_float64_agree() -> None:
    sigma = torch.from_numpy(np.sqrt(body_and_tail(2000, 7)))
    a, b = esd_stats(sigma), esd_stats(sigma.float())
    assert set(a) == set(b)
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-5), key


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="1-D"):
        powerlaw_fit(torch.ones(3, 4))
    with pytest.raises(ValueError, match="min_tail"):
        powerlaw_fit(torch.ones(30), min_tail=1)
    with pytest.raises(ValueError, match="xmin"):
        powerlaw_fit(torch.ones(30), xmin=0.0)
    with pytest.raises(ValueError, match=">= 0"):
        esd_stats(torch.tensor([1.0, -0.5]))
    with pytest.raises(TypeError, match="complex"):
        esd_stats(torch.ones(3, dtype=torch.complex64))


def test_one_million_values_fit_fast() -> None:
    x = torch.from_numpy(pareto(2.5, 1_000_000, seed=8)).float()
    t0 = time.perf_counter()
    fit = powerlaw_fit(x)
    assert time.perf_counter() - t0 < 2.0  # generous: ~0.2 s on one idle core
    assert abs(fit.alpha - 2.5) < 0.02


# ------------------------------------------------------------------------------------------
# WeightWatcher's own fit on identical eigenvalues (skipped where it is not installed)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_weightwatcher_on_identical_eigenvalues(seed: int) -> None:
    ww_powerlaw = pytest.importorskip("weightwatcher.WW_powerlaw")
    rng = np.random.default_rng(seed)
    w = rng.standard_t(df=3, size=(300, 150))  # heavy-tailed entries: a heavy-tailed ESD
    evals = np.linalg.svd(w, compute_uv=False) ** 2
    ref = ww_powerlaw.WWFit(evals)
    fit = powerlaw_fit(evals, min_tail=2, max_candidates=None)
    assert fit.xmin == ref.xmin
    assert fit.alpha == pytest.approx(ref.alpha, rel=1e-10)
    assert fit.ks_distance == pytest.approx(ref.D, rel=1e-9, abs=1e-12)
