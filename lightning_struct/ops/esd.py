"""Heavy-tailed ESD metrics (Martin & Mahoney; the WeightWatcher tool) from given singular values.

Input is a 1-D tensor of singular values ``sigma`` (any float dtype, any device; computed here in
float64 on the CPU). The empirical spectral density (ESD) is that of ``W^T W``: eigenvalues
``lambda = sigma^2``.

Power-law fit (Clauset, Shalizi & Newman 2009, continuous case)
----------------------------------------------------------------
For a lower cut-off ``xmin`` and the tail ``x_1 <= ... <= x_m`` of the values ``>= xmin`` the
maximum-likelihood exponent of the density ``p(x) ~ x^(-alpha)`` is::

    alpha = 1 + m / sum_k log(x_k / xmin)

and the Kolmogorov-Smirnov distance between the tail and the fitted law is::

    D = max_{k=0..m-1} | F(x_{k+1}) - k/m |,     F(x) = 1 - (x / xmin)^(1 - alpha)

(the empirical CDF just *below* each sorted point, the convention of the ``powerlaw`` package and
of WeightWatcher; the textbook two-sided supremum also compares with ``(k+1)/m`` and differs from
this by at most ``1/m``). Without a given ``xmin``, ``xmin`` is the candidate minimising ``D``;
the candidates are the distinct data values that leave at least ``min_tail`` values in the tail
(all of them, or ``max_candidates`` of them evenly spaced in rank for large inputs). ``alpha`` of
every candidate comes from one sorted array and suffix sums of ``log x``. ``D`` of every candidate
is first evaluated on ``ks_points`` rank-spaced points of its tail; since both CDFs are
monotone, this grid value is below the exact ``D`` by at most ``g/m`` (``g`` the largest rank gap
of the grid), so the exact minimiser is among the candidates whose grid value is at most
``min_c(D_grid + g/m)``. Those are then evaluated exactly over their full tails (in increasing
order of the grid value, stopping as soon as no remaining candidate can win), so the selected
``xmin`` is the exact KS minimiser over the candidates, and the returned ``ks_distance`` is
always the exact one of the returned ``xmin``. (A work cap of ``2^24`` tail points on that
refinement, not reached in practice, would make the choice approximate to within ``g/m``.)

Zero, negative and non-finite values are excluded from the fit and counted
(:attr:`PowerLawFit.n_excluded`). Fewer than ``min_tail`` usable values (or a tail of fewer than
``min_tail`` values above a given ``xmin``, or a tail of equal values) give NaN ``alpha``,
``xmin`` and ``ks_distance``, never an exception.

Metrics (:func:`esd_stats`)
---------------------------
* ``alpha``: the fit above on ``lambda = sigma^2`` of the non-zero singular values;
* ``log_spectral_norm = log10(lambda_max)``, ``lambda_max = sigma_max^2``;
* ``alpha_weighted = alpha * log10(lambda_max)``;
* ``ks_distance``, ``xmin`` (in units of ``lambda``), ``n_tail``, ``n_values``;
* ``n_zero``: singular values ``<= sigma_max * d * eps_float32`` (numpy's ``matrix_rank``
  tolerance with the float32 epsilon, whatever the input dtype; ``d`` is ``matrix_dim``, by default
  the number of values given), excluded from the fit. For a convolution operator from
  :mod:`lightning_struct.ops.spectral` pass the larger side of its per-frequency block,
  ``matrix_dim = max(C_out, S * C_in / groups)``: the default (all ``C_out * N / S`` values) is a
  tolerance far above the accuracy of those values and counts genuine small singular values as
  zero. Values from ``method="gram"`` are only resolved down to ``~1e-3 sigma_max`` in float32;
  below that they are noise, which this tolerance does not know.
* WeightWatcher's ``mp_softrank`` (Marchenko-Pastur bulk edge ``lambda_+`` over ``lambda_max``) is
  not provided: it rests on a kernel-density fit of the MP scale ``sigma_mp`` on a grid, with the
  aspect ratio ``Q`` of the matrix, and no clean stated fit of it is implemented here.

How these numbers differ from WeightWatcher's
---------------------------------------------
WeightWatcher (``weightwatcher`` 0.7.7, ``analyze()`` defaults) takes, for a PyTorch ``Conv2d``
weight of shape ``(N, C, kh, kw)``, the ``kh * kw`` per-tap matrices ``W[:, :, i, j]`` (each
``N x C``, transposed to have at least as many rows as columns), scales them by
``sqrt(1/2)`` (its ``conv2d_norm``, ``sqrt(conv2d_count / 2)`` with ``conv2d_count = 1``; so
its eigenvalues are half the squared singular values; ``Linear`` weights are not scaled),
pools the eigenvalues of all taps into one ESD, drops eigenvalues ``<= 1e-5`` (absolute), and fits
as above with every sorted eigenvalue but the largest as an ``xmin`` candidate (tails down to 2
values; below 20 eigenvalues it switches to a bias-corrected small-sample variant with a different
selection objective). Its ``log_spectral_norm`` and ``alpha_weighted`` use that scaled
``lambda_max``. On identical eigenvalues, ``powerlaw_fit(evals, min_tail=2, max_candidates=None)``
is that fit.

Here the intended input is the exact spectrum of the convolution *operator* on the layer's input
size (:func:`lightning_struct.ops.spectral.model_spectra`): for stride 1 the union over all
frequencies ``theta`` of the singular values of the symbol
``A(theta) = sum_{i,j} W[:, :, i, j] exp(i (theta_1 i + theta_2 j))``, a different matrix from
any one tap (the taps are its Fourier coefficients), unscaled. Its ``alpha`` and ``lambda_max``
are therefore not WeightWatcher's for the same layer. For ``Linear`` layers the eigenvalues are the
same. For a 1x1 conv they are WeightWatcher's times 2, each repeated once per (coarse) frequency,
plus zeros when it is strided (rank ``C_in`` out of ``C_out`` per frequency); at a given ``xmin``
neither the scale nor the repetition changes ``alpha`` or ``D``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["EPS_FLOAT32", "PowerLawFit", "esd_stats", "powerlaw_fit"]

EPS_FLOAT32 = float(torch.finfo(torch.float32).eps)
_REFINE_BUDGET = 1 << 24  # tail points evaluated exactly while refining the xmin search
_GRID_CHUNK = 1 << 21  # elements of one (candidates x ks_points) block

ArrayLike = torch.Tensor | np.ndarray | Sequence[float]


@dataclass(frozen=True)
class PowerLawFit:
    """A continuous power-law fit of a tail.

    Attributes:
        alpha: the MLE exponent of ``p(x) ~ x^-alpha`` above ``xmin`` (NaN if no fit).
        xmin: the lower cut-off, in units of the data (NaN if no fit).
        ks_distance: the exact KS distance of the tail at ``xmin`` (NaN if no fit).
        n_tail: number of values ``>= xmin`` (0 if no fit without a given ``xmin``).
        n: number of positive finite values the fit saw.
        n_excluded: zero, negative and non-finite values dropped before the fit.
    """

    alpha: float
    xmin: float
    ks_distance: float
    n_tail: int
    n: int
    n_excluded: int


def _as_float64(values: ArrayLike, name: str) -> torch.Tensor:
    t = values if isinstance(values, torch.Tensor) else torch.as_tensor(np.asarray(values))
    if t.is_complex():
        raise TypeError(f"{name}: complex values are not allowed (dtype {t.dtype})")
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    return t.detach().to(device="cpu", dtype=torch.float64)


def _check_int(value: object, name: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"powerlaw_fit: {name}={value!r}; an int >= {low} is allowed")


def _ks_exact(log_tail: torch.Tensor, log_xmin: float, alpha: float) -> float:
    """``max_k |1 - (x_k/xmin)^(1-alpha) - k/m|`` over a sorted tail given as ``log x``."""
    m = log_tail.numel()
    fitted = -torch.expm1((1.0 - alpha) * (log_tail - log_xmin))
    empirical = torch.arange(m, dtype=torch.float64) / m
    return float((fitted - empirical).abs().max())


def _ks_grid(
    logs: torch.Tensor, idx: torch.Tensor, alpha: torch.Tensor, points: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """KS distance of every candidate on ``points`` rank-spaced points of its tail, and the bound
    ``gap / m`` on how far below the exact distance it can be (0 where the grid is the tail)."""
    n = logs.numel()
    m = n - idx
    j = torch.arange(points, dtype=torch.int64)
    out = torch.empty(idx.numel(), dtype=torch.float64)
    rows = max(1, _GRID_CHUNK // points)
    for lo in range(0, idx.numel(), rows):
        sl = slice(lo, lo + rows)
        mc, ic = m[sl, None], idx[sl, None]
        k = (j * (mc - 1)) // (points - 1)  # every rank 0..m-1 is hit when m <= points
        diff = logs[ic + k] - logs[ic]
        fitted = -torch.expm1((1.0 - alpha[sl, None]) * diff)
        out[sl] = (fitted - k.to(torch.float64) / mc).abs().amax(dim=1)
    gap = (m - 1 + points - 2) // (points - 1)  # ceil((m - 1) / (points - 1))
    slack = torch.where(m <= points, 0.0, gap.to(torch.float64) / m)
    return out, slack


def powerlaw_fit(
    eigenvalues: ArrayLike,
    xmin: float | None = None,
    *,
    min_tail: int = 10,
    max_candidates: int | None = 1000,
    ks_points: int = 2048,
) -> PowerLawFit:
    """Continuous power-law MLE of the tail of ``eigenvalues``, ``xmin`` by minimum KS distance.

    See the module docstring for the formulas and the search.

    Args:
        eigenvalues: 1-D values ``x`` (e.g. ``lambda = sigma^2``); zero, negative and non-finite
            entries are excluded and counted.
        xmin: a fixed cut-off (used as given, need not be a data value); ``None``: searched.
        min_tail: the fewest values a tail may have (>= 2; default 10: below that the MLE's
            standard error ``(alpha - 1)/sqrt(m)`` exceeds ~30% of ``alpha - 1``); fewer usable
            values than this give a NaN fit.
        max_candidates: at most this many ``xmin`` candidates, evenly spaced in rank (``None``:
            every distinct value, the ``powerlaw`` package's search; ``O(n)`` candidates).
        ks_points: tail points per candidate in the first, vectorised KS pass (>= 2).

    Returns:
        A :class:`PowerLawFit`.

    Raises:
        ValueError: a non-1-D input or a bad option.
    """
    _check_int(min_tail, "min_tail", 2)
    _check_int(ks_points, "ks_points", 2)
    if max_candidates is not None:
        _check_int(max_candidates, "max_candidates", 1)
    if xmin is not None and not (math.isfinite(float(xmin)) and float(xmin) > 0):
        raise ValueError(f"powerlaw_fit: xmin={xmin!r}; a finite value > 0 or None is allowed")
    x = _as_float64(eigenvalues, "eigenvalues")
    total = x.numel()
    x = x[torch.isfinite(x) & (x > 0)]
    n = x.numel()
    n_excluded = total - n

    def no_fit(n_tail: int = 0, cut: float = math.nan) -> PowerLawFit:
        return PowerLawFit(math.nan, cut, math.nan, n_tail, n, n_excluded)

    if n < min_tail:
        return no_fit()
    x = torch.sort(x).values
    if xmin is not None:
        cut = float(xmin)
        first = int(torch.searchsorted(x, torch.tensor([cut], dtype=torch.float64)))
        log_tail = torch.log(x[first:])
        m = log_tail.numel()
        s = float((log_tail - math.log(cut)).sum())
        if m < min_tail or not s > 0:
            return no_fit(m, cut)
        alpha = 1.0 + m / s
        return PowerLawFit(alpha, cut, _ks_exact(log_tail, math.log(cut), alpha), m, n, n_excluded)

    logs = torch.log(x)
    logs = logs - logs[0]  # >= 0: smaller magnitudes in the suffix sums
    suffix = torch.flip(torch.cumsum(torch.flip(logs, (0,)), 0), (0,))  # suffix[i] = sum logs[i:]
    last = n - min_tail
    if max_candidates is None or last + 1 <= max_candidates:
        idx = torch.arange(last + 1)
    else:
        idx = torch.linspace(0, last, max_candidates, dtype=torch.float64).round().long()
    # a candidate's tail is every value >= it: move each index to the first of its ties
    idx = torch.unique(torch.searchsorted(x, x[idx]))
    m = n - idx
    s = suffix[idx] - m * logs[idx]
    ok = (x[idx] < x[-1]) & (s > 0)
    idx, m, s = idx[ok], m[ok], s[ok]
    if idx.numel() == 0:
        return no_fit()
    alpha = 1.0 + m.to(torch.float64) / s
    d_grid, slack = _ks_grid(logs, idx, alpha, ks_points)

    # exact refinement: the exact minimiser has d_grid <= min(d_grid + slack)
    bound = float((d_grid + slack).min())
    order = torch.argsort(d_grid, stable=True).tolist()
    best_d, best_c, work = math.inf, -1, 0
    for c in order:
        lower = float(d_grid[c])
        if lower > bound or lower > best_d or work > _REFINE_BUDGET:
            break
        i = int(idx[c])
        if float(slack[c]) == 0.0:
            d = lower
        else:
            d = _ks_exact(logs[i:], float(logs[i]), float(alpha[c]))
            work += n - i
        if d < best_d or (d == best_d and i < int(idx[best_c])):
            best_d, best_c = d, c
    i = int(idx[best_c])
    return PowerLawFit(float(alpha[best_c]), float(x[i]), best_d, int(m[best_c]), n, n_excluded)


def esd_stats(
    singular_values: ArrayLike,
    *,
    matrix_dim: int | None = None,
    min_tail: int = 10,
    max_candidates: int | None = 1000,
    ks_points: int = 2048,
) -> dict[str, float]:
    """WeightWatcher-style heavy-tail metrics of the ESD ``lambda = sigma^2`` of ``singular_values``.

    Args:
        singular_values: 1-D singular values (>= 0; non-finite entries are dropped).
        matrix_dim: ``d`` in the zero tolerance ``sigma_max * d * eps_float32`` (``None``: the
            number of values). For a conv operator pass ``max(C_out, S * C_in / groups)``.
        min_tail, max_candidates, ks_points: options of :func:`powerlaw_fit`.

    Returns:
        ``{"alpha", "alpha_weighted", "log_spectral_norm", "ks_distance", "xmin", "n_tail",
        "n_zero", "n_values"}`` as floats (``xmin`` in units of ``lambda``). NaN where undefined;
        ``log_spectral_norm = -inf`` for an all-zero spectrum.

    Raises:
        ValueError: a non-1-D input, a negative singular value or a bad option.
    """
    if matrix_dim is not None:
        _check_int(matrix_dim, "matrix_dim", 1)
    s = _as_float64(singular_values, "singular_values")
    n_values = s.numel()
    s = s[torch.isfinite(s)]
    if s.numel() and float(s.min()) < 0:
        raise ValueError(f"esd_stats: singular values must be >= 0, got min {float(s.min())}")
    sigma_max = float(s.max()) if s.numel() else math.nan
    tol = sigma_max * (matrix_dim if matrix_dim is not None else n_values) * EPS_FLOAT32
    nonzero = s > tol
    n_zero = int(s.numel() - int(nonzero.sum()))
    fit = powerlaw_fit(s[nonzero] ** 2, min_tail=min_tail, max_candidates=max_candidates, ks_points=ks_points)
    lambda_max = sigma_max * sigma_max
    log_norm = math.log10(lambda_max) if lambda_max > 0 else (-math.inf if lambda_max == 0 else math.nan)
    weighted = fit.alpha * log_norm if math.isfinite(fit.alpha) and math.isfinite(log_norm) else math.nan
    return {
        "alpha": fit.alpha,
        "alpha_weighted": weighted,
        "log_spectral_norm": log_norm,
        "ks_distance": fit.ks_distance,
        "xmin": fit.xmin,
        "n_tail": float(fit.n_tail),
        "n_zero": float(n_zero),
        "n_values": float(n_values),
    }
