"""Exact singular values of convolution operators by Local Fourier Analysis (LFA).

A convolution with **periodic boundary** on an input of spatial size ``n = (n_1, ..., n_d)`` is a
linear map ``R^{C_in * N} -> R^{C_out * N / S}`` (``N = prod n``, ``S = prod stride``). Its
singular values are computed here from the Fourier symbol of the kernel, batched over
frequencies, without ever forming the ``(C_out N/S) x (C_in N)`` matrix.

Math (van Betteray, Rottmann & Kahl 2025; FFT form: Sedghi, Gupta & Long 2019)
---------------------------------------------------------------------------------
PyTorch convolution is a cross-correlation, ``y[o, a] = sum_{c,u} w[o, c, u] x[c, s*a + u*dil]``
(indices modulo ``n``; padding only shifts phases and never changes singular values). For a
Fourier mode ``x = v exp(i theta . x)`` with ``theta_j = 2 pi j / n`` the stride-1 operator
returns ``A(theta) v exp(i theta . x)`` with the **symbol**

    A(theta) = sum_u w[:, :, u] exp(i theta . (u * dil))            (C_out x C_in, complex)

so the stride-1 operator is block-diagonal in the Fourier basis and its singular values are the
union over the ``N`` frequencies of those of ``A(theta)``.

With stride ``s`` the operator is only invariant under shifts on the coarse lattice. The coarse
frequency ``Theta = 2 pi J / m`` (``m = n / s``) collects the ``S`` fine frequencies
``theta_a = (Theta + 2 pi a) / s``, ``a in {0..s-1}^d`` (fine index ``J + a m``), and the block
symbol

    B(Theta) = S^{-1/2} [A(theta_a1) | ... | A(theta_aS)]           (C_out x S*C_in)

carries the singular values: ``sigma(K) = union_Theta sigma(B(Theta))``. That gives
``(N/S) * min(C_out, S*C_in)`` values, i.e. ``min(C_out N/S, C_in N)``: every singular value of
the operator, zeros included. Groups make the operator block-diagonal: one symbol per group.

Real kernels give ``B(-Theta) = conj(B(Theta))`` up to a column permutation, so only the
frequencies with last index ``J_d in [0, m_d/2]`` (an ``rfft`` half grid) are computed. A
frequency of that half grid whose conjugate is *also* in it (``J_d = 0`` or ``2 J_d = m_d``) is
counted once; every other one stands for itself and its conjugate and is counted twice
(:attr:`ConvSpectrum.multiplicity`), so the multiset of :meth:`ConvSpectrum.values` is exactly
the operator's.

Cost and methods
----------------
* Symbol (:mod:`.symbols`): separable phase matrices, ``O(F k C_out C_in)`` for ``F = N / (2S)``
  half-grid frequencies; tap phases are reduced modulo ``n`` in integer arithmetic.
* ``method="gram"`` (what ``"auto"`` uses in float32; :mod:`.gram`): the Hermitian Gram matrix of
  the smaller side is itself the symbol of a convolution (``K K^T`` or ``K^T K``) whose taps are the
  autocorrelation of the kernel (one GEMM, ``O(k^{2d} C^3)`` once per layer), so the per-frequency
  Gram costs ``O(F C^2 (2k-1))`` instead of ``O(F C^3)``; then ``eigvalsh`` and
  ``sigma = sqrt(lambda)``. Eigenvalues are accurate to about ``10 eps lambda_max``, so singular
  values are accurate to about ``sqrt(10 eps) * sigma_max`` **absolute** (~1e-3 sigma_max in
  float32, ~3e-8 sigma_max in float64): large singular values are exact to working precision,
  the smallest ones of an ill-conditioned layer are resolved only down to that floor.
* ``method="svd"``: ``torch.linalg.svdvals`` of the block symbol (absolute accuracy ~``eps *
  sigma_max``; slower). Use it when the smallest singular values / the condition number matter.
* On CPU, batched LAPACK calls are split over the intra-op threads, one single-threaded LAPACK
  call per thread (:mod:`._pool`): OpenMP threading of many small matrices costs more than it
  gains. CPU eigenvalues of large Gram matrices go through SciPy's LAPACK (:mod:`.eigen`,
  :mod:`._lapack`).
* Big temporaries are written into re-used buffers where it matters: re-using a buffer avoids the
  page faults of a fresh large allocation, which can cost as much as the GEMM that fills it.
* :func:`conv_spectral_norm` (the every-step path, :mod:`.norm`): Lanczos, see its docstring.
* Routes, thresholds and chunk sizes are fields of :data:`config` (a :class:`SpectralConfig`;
  :func:`spectral_config` sets them for a ``with`` block).

Zero padding is not shift-invariant: the values here are those of the periodic operator; the
gap to the zero-padded operator shrinks as ``n`` grows. For exact zero-padded values of small
layers use the explicit matrix (:func:`explicit_conv_matrix`).

Modules: ``nn.Conv*d`` / ``nn.Linear`` adapters in :mod:`.modules`; the per-layer spectra of a
model (what ``SpectralMonitor`` and ``lightning-struct spectra`` compute) in :mod:`.model`;
clipping in :mod:`.clip`; the brute-force matrix in :mod:`.reference`.
"""

from __future__ import annotations

import warnings
from typing import Any

from lightning_struct.ops.spectral._config import GramRoute, SpectralConfig, config, spectral_config
from lightning_struct.ops.spectral.clip import clip_conv_operator_norm
from lightning_struct.ops.spectral.full import Method, conv_singular_values, conv_spectrum, linear_spectrum
from lightning_struct.ops.spectral.model import (
    NORM_STATS,
    LayerSpectrum,
    StatsKind,
    lipschitz_bound,
    model_spectra,
    stat_names,
)
from lightning_struct.ops.spectral.modules import (
    CONV_TYPES,
    SUPPORTED_TYPES,
    module_spectral_norm,
    module_spectrum,
    module_warm_norm,
)
from lightning_struct.ops.spectral.norm import NormMethod, conv_spectral_norm
from lightning_struct.ops.spectral.padded import padded_conv_norm
from lightning_struct.ops.spectral.reference import explicit_conv_matrix
from lightning_struct.ops.spectral.result import SPECTRUM_STATS, ConvSpectrum, reshape_bound
from lightning_struct.ops.spectral.symbols import conv_symbol, frequency_mode
from lightning_struct.ops.spectral.warm import NormState, warm_conv_spectral_norm, warm_linear_norm

__all__ = [
    "padded_conv_norm",
    "CONV_TYPES",
    "NORM_STATS",
    "SPECTRUM_STATS",
    "SUPPORTED_TYPES",
    "ConvSpectrum",
    "GramRoute",
    "LayerSpectrum",
    "Method",
    "NormMethod",
    "NormState",
    "SpectralConfig",
    "StatsKind",
    "clip_conv_operator_norm",
    "config",
    "conv_singular_values",
    "conv_spectral_norm",
    "conv_spectrum",
    "conv_symbol",
    "explicit_conv_matrix",
    "frequency_mode",
    "linear_spectrum",
    "lipschitz_bound",
    "model_spectra",
    "module_spectral_norm",
    "module_spectrum",
    "module_warm_norm",
    "reshape_bound",
    "spectral_config",
    "stat_names",
    "warm_conv_spectral_norm",
    "warm_linear_norm",
]

# former module-level switches, now fields of `config` (read-only aliases: assigning them has no effect)
_RENAMED = {"PARALLEL_LINALG": "parallel_linalg", "USE_SCIPY_LAPACK": "use_scipy_lapack"}


def __getattr__(name: str) -> Any:
    field_name = _RENAMED.get(name)
    if field_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"lightning_struct.ops.spectral.{name} is deprecated: read or set config.{field_name} "
        f"(or use spectral_config({field_name}=...))",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(config, field_name)
