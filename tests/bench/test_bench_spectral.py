"""The spectral benchmark: its numpy baselines compute the same spectra; rows on a tiny case."""

from __future__ import annotations

import numpy as np
import torch

from lightning_struct.bench import spectral as bench
from lightning_struct.ops.spectral import conv_singular_values, explicit_conv_matrix


def test_numpy_baselines_match_explicit_matrix():
    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    ref = torch.linalg.svdvals(explicit_conv_matrix(w, (6, 6))).numpy()
    sedghi = np.sort(bench.sedghi_numpy(w.numpy().transpose(2, 3, 1, 0), 6).ravel())[::-1]
    lfa = np.sort(bench.lfa_numpy(w.numpy(), 6).ravel())[::-1]
    np.testing.assert_allclose(sedghi, ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(lfa, ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(conv_singular_values(w, (6, 6)).numpy(), ref, rtol=1e-10, atol=1e-12)


def test_rows_of_a_tiny_grid_point():
    rows = bench._grid_rows(8, 8, quick=True)
    assert [(r.case, r.baseline) for r in rows] == [
        ("full c8 n8", "numpy Sedghi FFT"),
        ("full c8 n8", "numpy LFA"),
        ("full c8 n8", "limit: the eigensolver alone"),
        ("norm c8 n8", "numpy Sedghi FFT"),
        ("norm c8 n8", "ours full"),
        ("norm c8 n8", rows[5].baseline),
    ]
    assert rows[5].baseline.startswith("Gram iteration x") and rows[5].extra["bound/exact"] >= 1 - 1e-5
    assert all(r.ours_s > 0 and r.baseline_s > 0 for r in rows)
    assert rows[0].extra["max_abs_err/sigma_max"] < 1e-4
    assert rows[3].extra["rel_err"] < 1e-5
    assert rows[2].extra["ours/limit"] == rows[2].ours_s / rows[2].baseline_s and rows[2].extra["gram_formation_s"] > 0
    row = bench._explicit_row(4, 4)
    assert row.baseline == "explicit SVD (torch)" and row.extra["max_abs_err/sigma_max"] < 1e-4


def test_the_limit_solves_the_symbols_ours_factorizes():
    """gram_symbols + solve_gram_symbols give exactly ours's eigenvalues (the limit times the same work)."""
    from lightning_struct.ops.spectral import conv_spectrum
    from lightning_struct.ops.spectral.full import gram_symbols, solve_gram_symbols

    torch.manual_seed(0)
    for shape, n in (((16, 16, 3, 3), 8), ((12, 20, 1, 1), 6), ((24, 8, 3, 3), 6)):
        w = torch.randn(*shape)
        eig = torch.cat(solve_gram_symbols([m.clone() for m in gram_symbols(w, (n, n))]))
        ours = conv_spectrum(w, (n, n), method="gram").sigma
        if shape[-1] == 1:
            eig = eig.expand(ours.shape[0], *eig.shape[1:])
        torch.testing.assert_close(eig.clamp_min(0).sqrt()[..., : ours.shape[-1]], ours, rtol=1e-5, atol=1e-5)


def test_gram_iteration_is_an_upper_bound_that_tightens_to_the_exact_norm():
    """Delattre et al. (2023): the bound decreases with the iterations, never below the exact norm,
    and lands on it (float32) by 8 iterations; also for a non-square kernel."""
    from lightning_struct.ops.spectral import conv_spectrum

    torch.manual_seed(0)
    for shape, n in (((16, 16, 3, 3), 8), ((24, 10, 3, 3), 6)):
        w = torch.randn(*shape)
        exact = float(conv_spectrum(w.double(), (n, n)).sigma_max)
        bounds = [float(bench.gram_iteration_bound(w, n, t)) for t in range(1, 9)]
        assert all(b >= exact * (1 - 1e-5) for b in bounds)
        assert all(a >= b * (1 - 1e-6) for a, b in zip(bounds, bounds[1:]))
        assert bounds[0] > 1.05 * exact  # one iteration is loose: the test can tell the two apart
        assert bounds[-1] == np.float64(bounds[-1]) and abs(bounds[-1] - exact) / exact < 1e-4
