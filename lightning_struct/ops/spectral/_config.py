"""The tunables of :mod:`lightning_struct.ops.spectral` in one object.

Every op of the package reads :data:`config` when it is called. Change a field for the whole
process (``config.parallel_linalg = False``) or for one block, restored on exit::

    from lightning_struct.ops.spectral import spectral_config

    with spectral_config(gram_route="symbol", use_scipy_lapack=False):
        ...

The fields choose routes, chunk sizes and iteration details, never what is computed: every route
returns the same singular values to its documented accuracy. The fields are process-wide, so
:func:`spectral_config` is not meant to be entered from several threads at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

import torch

from lightning_struct._checks import check_bool, check_choice, check_int, check_number, check_unknown

__all__ = ["GramRoute", "SpectralConfig", "config", "spectral_config"]

GramRoute = Literal["auto", "taps", "symbol"]

_WHERE = "SpectralConfig"
_POSITIVE_INTS = (
    "scipy_lapack_from",
    "chunk_bytes",
    "norm_chunk_bytes",
    "lanczos_runs_small",
    "lanczos_runs_large",
    "lanczos_large_from",
    "exact_below_float32",
    "exact_below_float64",
)


@dataclass
class SpectralConfig:
    """Speed knobs of the spectral ops (see the package docstring for the routes).

    Attributes:
        parallel_linalg: on CPU, split batched LAPACK calls and independent chunks of frequencies
            over the intra-op threads, one single-threaded call per thread (OpenMP threading of
            many small matrices costs more than it gains, most of all on shared cores).
        use_scipy_lapack: CPU eigenvalues of Gram matrices of at least ``scipy_lapack_from`` rows
            through SciPy's LAPACK (:mod:`._lapack`) instead of ``torch.linalg.eigvalsh``.
        scipy_lapack_from: the matrix size from which that route is taken.
        gram_route: how per-frequency Gram matrices are formed: ``"auto"`` (the cost model
            decides), ``"taps"`` (the Gram symbol from the kernel's autocorrelation taps wherever
            that route exists: not for the input-side Gram of a strided convolution) or
            ``"symbol"`` (from the block symbol ``B``, as ``B B^H`` / ``B^H B`` or ``B (B^H x)``).
        chunk_bytes: bytes of complex symbol per chunk of frequencies of the full spectrum
            (bounds the memory of one chunk).
        norm_chunk_bytes: operator bytes per batched Lanczos call (keeps the working set of the
            iterations in the last-level cache).
        lanczos_runs_small / lanczos_runs_large: independent Lanczos runs per problem below /
            from ``lanczos_large_from`` rows. A second random start is almost free in the batched
            row-vector products of small problems and nearly doubles the cost of large ones.
        lanczos_large_from: see above.
        exact_below_float32 / exact_below_float64: problems smaller than this (per side) take
            the exact eigenvalues instead of Lanczos.
        lanczos_rtol_float32 / lanczos_rtol_float64: default stagnation tolerance (relative
            growth of the top Ritz value over two steps).
        lanczos_margin: extra steps on top of those the first sub-chunk of a worker needed.
    """

    parallel_linalg: bool = True
    use_scipy_lapack: bool = True
    scipy_lapack_from: int = 96
    gram_route: GramRoute = "auto"
    chunk_bytes: int = 16 * 2**20
    norm_chunk_bytes: int = 8 * 2**20
    lanczos_runs_small: int = 2
    lanczos_runs_large: int = 1
    lanczos_large_from: int = 256
    exact_below_float32: int = 33
    exact_below_float64: int = 129
    lanczos_rtol_float32: float = 1e-4
    lanczos_rtol_float64: float = 1e-10
    lanczos_margin: int = 1

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` / ``TypeError`` naming a field with a bad value."""
        check_bool(self.parallel_linalg, "parallel_linalg", _WHERE)
        check_bool(self.use_scipy_lapack, "use_scipy_lapack", _WHERE)
        check_choice(self.gram_route, "gram_route", ("auto", "taps", "symbol"), _WHERE)
        for name in _POSITIVE_INTS:
            check_int(getattr(self, name), name, _WHERE, minimum=1)
        check_int(self.lanczos_margin, "lanczos_margin", _WHERE, minimum=0)
        for name in ("lanczos_rtol_float32", "lanczos_rtol_float64"):
            check_number(getattr(self, name), name, _WHERE, minimum=0, maximum=1, open_min=True, open_max=True)

    def exact_below(self, dtype: torch.dtype) -> int:
        """:attr:`exact_below_float64` for float64, else :attr:`exact_below_float32`."""
        return self.exact_below_float64 if dtype == torch.float64 else self.exact_below_float32

    def lanczos_rtol(self, dtype: torch.dtype) -> float:
        """:attr:`lanczos_rtol_float64` for float64, else :attr:`lanczos_rtol_float32`."""
        return self.lanczos_rtol_float64 if dtype == torch.float64 else self.lanczos_rtol_float32

    def lanczos_runs(self, size: int) -> int:
        """Independent Lanczos runs for a problem of ``size`` rows."""
        return self.lanczos_runs_large if size >= self.lanczos_large_from else self.lanczos_runs_small


#: the one instance every op reads
config = SpectralConfig()


@contextmanager
def spectral_config(**overrides: Any) -> Iterator[SpectralConfig]:
    """Set fields of :data:`config` for the ``with`` block and restore them afterwards.

    Raises:
        ValueError: an unknown field (with a close match if any) or a bad value, before anything
            is changed.
    """
    check_unknown(overrides, [f.name for f in fields(SpectralConfig)], "field", "spectral_config")
    replace(config, **overrides)  # validates the new values as a whole
    saved = {name: getattr(config, name) for name in overrides}
    for name, value in overrides.items():
        setattr(config, name, value)
    try:
        yield config
    finally:
        for name, value in saved.items():
            setattr(config, name, value)
