"""The fast paths of ``ops.spectral``: SciPy LAPACK eigenvalues, tridiagonal Ritz values, Lanczos
norms on both operator routes, and the Gram-taps symbols, each against a brute-force reference;
the routes are forced through ``spectral_config``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import lightning_struct.ops.spectral as sp
from lightning_struct.ops.spectral import (
    _lapack,
    config,
    conv_singular_values,
    conv_spectral_norm,
    conv_spectrum,
    spectral_config,
)
from lightning_struct.ops.spectral.eigen import _eigvalsh_desc
from lightning_struct.ops.spectral.norm import _tridiag_top

needs_scipy_lapack = pytest.mark.skipif(not _lapack.available(torch.complex64), reason="no SciPy LAPACK")


def _hermitian(B: int, n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype.is_complex:
        rdt = torch.float64 if dtype == torch.complex128 else torch.float32
        A = torch.complex(torch.randn(B, n, n, generator=g, dtype=rdt), torch.randn(B, n, n, generator=g, dtype=rdt))
    else:
        A = torch.randn(B, n, n, generator=g, dtype=dtype)
    return (A @ A.mH).contiguous()


@needs_scipy_lapack
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128, torch.float32, torch.float64])
def test_scipy_lapack_eigvalsh_matches_numpy(dtype):
    G = _hermitian(5, 37, dtype)
    ref = np.linalg.eigvalsh(G.to(torch.complex128 if dtype.is_complex else torch.float64).numpy())
    ours = _lapack.eigvalsh(G.clone())
    assert ours.dtype == (torch.float64 if dtype in (torch.complex128, torch.float64) else torch.float32)
    tol = 1e-12 if ours.dtype == torch.float64 else 2e-5
    np.testing.assert_allclose(ours.double().numpy(), ref, rtol=tol, atol=tol * ref.max())


@needs_scipy_lapack
def test_scipy_lapack_rejects_bad_layout_and_handles_empty_batches():
    G = _hermitian(2, 8, torch.complex64)
    with pytest.raises(ValueError, match="contiguous CPU"):
        _lapack.eigvalsh(G.transpose(1, 2))
    assert _lapack.eigvalsh(torch.empty(0, 4, 4, dtype=torch.complex64)).shape == (0, 4)


@needs_scipy_lapack
def test_eigvalsh_desc_same_on_both_routes_and_keeps_input():
    G = _hermitian(7, 100, torch.complex64, seed=3)
    assert G.shape[-1] >= config.scipy_lapack_from
    keep = G.clone()
    scipy_route = _eigvalsh_desc(G)
    torch.testing.assert_close(G, keep, rtol=0, atol=0)  # not overwritten unless asked
    with spectral_config(use_scipy_lapack=False):
        torch_route = _eigvalsh_desc(G)
    torch.testing.assert_close(scipy_route, torch_route, rtol=1e-4, atol=1e-4 * float(torch_route.max()))
    assert bool((scipy_route[..., :-1] >= scipy_route[..., 1:]).all())  # descending


@pytest.mark.parametrize("k", [1, 2, 7])
def test_tridiag_top_is_the_largest_eigenvalue(k):
    g = torch.Generator().manual_seed(k)
    alpha, beta = torch.randn(k, 50, generator=g, dtype=torch.float64), torch.rand(k - 1, 50, generator=g, dtype=torch.float64)
    T = torch.diag_embed(alpha.T)
    if k > 1:
        T = T + torch.diag_embed(beta.T, 1) + torch.diag_embed(beta.T, -1)
    ref = np.linalg.eigvalsh(T.numpy())[:, -1]
    np.testing.assert_allclose(_tridiag_top(alpha, beta).numpy(), ref, rtol=1e-12)


def _exact_norm(w: torch.Tensor, n, **kw) -> float:
    return float(conv_spectrum(w.double(), n, method="svd", **kw).sigma_max)


@pytest.mark.parametrize(
    "co,ci,n,stride,route",
    [
        (64, 64, (10, 10), 1, "taps"),  # Gram symbol from autocorrelation taps, 2 runs
        (64, 64, (10, 10), 1, "symbol"),  # B^H then B with the block symbol
        (256, 256, (4, 4), 1, "symbol"),  # >= 256 channels: one run per frequency
        (320, 96, (6, 6), 1, "taps"),  # input-side Gram (S*C_in < C_out)
        (64, 96, (8, 8), 2, "taps"),  # strided output-side Gram taps
        (96, 64, (8, 8), 2, "symbol"),  # strided, input side via the block symbol
    ],
)
def test_lanczos_norm_on_both_routes_matches_full_spectrum(co, ci, n, stride, route):
    g = torch.Generator().manual_seed(co + ci + stride)
    w = torch.randn(co, ci, 3, 3, generator=g) * math.sqrt(2 / (9 * ci))
    exact = _exact_norm(w, n, stride=stride)
    with spectral_config(gram_route=route):
        fast = float(conv_spectral_norm(w, n, stride=stride))
    assert fast <= exact * (1 + 1e-5)  # Ritz values approach from below
    assert (exact - fast) / exact <= 1e-3, (fast, exact)
    # tighter tolerance -> closer, and the float64 path converges to ~machine precision
    assert float(conv_spectral_norm(w, n, stride=stride, dtype=torch.float64)) == pytest.approx(exact, rel=1e-8)


def test_lanczos_breakdown_on_low_rank_operators_is_exact():
    """A rank-1 kernel: the Krylov space is invariant after one step (beta = 0)."""
    g = torch.Generator().manual_seed(5)
    u, v = torch.randn(64, 1, 1, 1, generator=g), torch.randn(1, 64, 3, 3, generator=g)
    w = u * v
    exact = _exact_norm(w, (8, 8))
    assert float(conv_spectral_norm(w, (8, 8))) == pytest.approx(exact, rel=1e-4)
    assert math.isfinite(float(conv_spectral_norm(torch.zeros(64, 64, 3, 3), (8, 8))))


def test_spectral_norm_rtol_is_validated_and_used():
    w = torch.randn(64, 64, 3, 3)
    with pytest.raises(ValueError, match="rtol"):
        conv_spectral_norm(w, (8, 8), rtol=0.0)
    loose, tight = (float(conv_spectral_norm(w, (8, 8), rtol=r)) for r in (0.5, 1e-7))
    assert loose <= tight * (1 + 1e-6)


def test_full_spectrum_same_on_taps_and_symbol_routes():
    g = torch.Generator().manual_seed(11)
    w = torch.randn(24, 20, 3, 3, generator=g, dtype=torch.float64)
    for stride in (1, 2):
        with spectral_config(gram_route="taps"):
            taps = conv_singular_values(w, (8, 8), stride=stride, method="gram")
        with spectral_config(gram_route="symbol"):
            sym = conv_singular_values(w, (8, 8), stride=stride, method="gram")
        svd = conv_singular_values(w, (8, 8), stride=stride, method="svd")
        torch.testing.assert_close(taps, sym, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(taps, svd, rtol=1e-6, atol=1e-6 * float(svd[0]))


@needs_scipy_lapack
def test_full_spectrum_scipy_route_matches_torch_route():
    g = torch.Generator().manual_seed(12)
    w = torch.randn(128, 128, 3, 3, generator=g) * 0.03
    ours = conv_singular_values(w, (6, 6))
    with spectral_config(use_scipy_lapack=False):
        ref = conv_singular_values(w, (6, 6))
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=2e-3 * float(ref[0]))


def test_reshape_bound_is_lazy_and_correct():
    w = torch.randn(8, 4, 3, 3, dtype=torch.float64)
    spec = conv_spectrum(w, (6, 6))
    assert callable(spec.reshape_sigma_max)
    ref = 3.0 * torch.linalg.matrix_norm(w.reshape(8, -1), ord=2)
    assert float(spec.reshape_bound) == pytest.approx(float(ref), rel=1e-12)
    assert not callable(spec.reshape_sigma_max)  # computed once, kept


def test_forced_taps_route_falls_back_where_it_does_not_exist():
    """The input-side Gram of a strided conv has no taps route: gram_route="taps" uses the symbol."""
    g = torch.Generator().manual_seed(13)
    w = torch.randn(40, 6, 3, 3, generator=g, dtype=torch.float64)  # C_out=40 > S*C_in=24: input side
    ref = conv_singular_values(w, (8, 8), stride=2, method="svd")
    with spectral_config(gram_route="taps"):
        forced = conv_singular_values(w, (8, 8), stride=2, method="gram")
        norm = float(conv_spectral_norm(w, (8, 8), stride=2))
    torch.testing.assert_close(forced, ref, rtol=1e-6, atol=1e-6 * float(ref[0]))
    assert norm == pytest.approx(float(ref[0]), rel=1e-8)


def test_spectral_config_sets_restores_and_validates():
    before = (config.parallel_linalg, config.gram_route, config.scipy_lapack_from)
    with spectral_config(parallel_linalg=False, gram_route="symbol") as cfg:
        assert cfg is config and not config.parallel_linalg and config.gram_route == "symbol"
    assert (config.parallel_linalg, config.gram_route, config.scipy_lapack_from) == before
    with pytest.raises(RuntimeError), spectral_config(scipy_lapack_from=8):
        assert config.scipy_lapack_from == 8
        raise RuntimeError  # restored on an exception too
    assert config.scipy_lapack_from == before[2]
    with pytest.raises(ValueError, match="unknown field.*'gram_rout'.*did you mean 'gram_route'"):
        with spectral_config(gram_rout="taps"):
            pass
    with pytest.raises(ValueError, match="gram_route='fast'; allowed: 'auto', 'taps', 'symbol'"):
        with spectral_config(gram_route="fast"):
            pass
    with pytest.raises(ValueError, match="chunk_bytes=0 must be an int >= 1"):
        with spectral_config(chunk_bytes=0):
            pass
    with pytest.raises(TypeError, match="parallel_linalg=1 must be a bool"):
        with spectral_config(parallel_linalg=1):
            pass
    assert (config.parallel_linalg, config.gram_route, config.scipy_lapack_from) == before  # nothing changed
    with pytest.warns(DeprecationWarning, match="config.parallel_linalg"):
        assert sp.PARALLEL_LINALG is config.parallel_linalg
