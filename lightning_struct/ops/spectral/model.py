"""Per-layer spectra of a model: the one loop behind ``SpectralMonitor`` and ``lightning-struct spectra``.

The caller selects the layers and knows their input sizes (e.g. from a forward pre-hook); this
module only reads their weights and hyper-parameters, under ``torch.no_grad()``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from lightning_struct._checks import check_choice
from lightning_struct.ops.spectral.full import Method
from lightning_struct.ops.spectral.modules import (
    SUPPORTED_TYPES,
    module_spectral_norm,
    module_spectrum,
    module_warm_norm,
)
from lightning_struct.ops.spectral.result import SPECTRUM_STATS
from lightning_struct.ops.spectral.warm import NormState

__all__ = ["NORM_STATS", "LayerSpectrum", "StatsKind", "lipschitz_bound", "model_spectra", "stat_names"]

StatsKind = Literal["full", "norm"]
#: the statistics of ``stats="norm"`` (the fast spectral-norm path)
NORM_STATS: tuple[str, ...] = ("sigma_max",)


def stat_names(stats: StatsKind) -> tuple[str, ...]:
    """The statistic names :func:`model_spectra` returns for ``stats`` (``"full"`` or ``"norm"``)."""
    return SPECTRUM_STATS if stats == "full" else NORM_STATS


@dataclass
class LayerSpectrum:
    """The spectrum of one layer of a model.

    Attributes:
        name: the layer's qualified name.
        kind: its class name (``"Conv2d"``, ``"Linear"`` ...).
        weight_shape: shape of its weight.
        input_size: the spatial input size the operator was taken at (``()`` for ``nn.Linear``).
        stats: ``{name: value}`` for :func:`stat_names` of the requested ``stats`` (NaN for
            every statistic when the weights hold NaN/inf).
        values: every singular value of the operator (1-D, descending) for ``stats="full"`` with
            finite weights, else ``None``.
        finite: ``False`` when the weights hold NaN/inf (the statistics are NaN then).
        seconds: wall time spent on this layer.
    """

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    input_size: tuple[int, ...]
    stats: dict[str, float]
    values: torch.Tensor | None = field(default=None, repr=False)
    finite: bool = True
    seconds: float = 0.0


def model_spectra(
    layers: Iterable[tuple[str, nn.Module]],
    input_sizes: Mapping[str, Sequence[int]],
    *,
    stats: StatsKind = "full",
    method: Method = "svd",
    dtype: torch.dtype | None = None,
    states: dict[str, NormState] | None = None,
) -> dict[str, LayerSpectrum]:
    """Spectra of ``layers`` (``nn.Conv1d/2d/3d`` at their input size, ``nn.Linear``), in order.

    Args:
        layers: ``(name, module)`` pairs; a module's ``weight`` is read (the effective weight of a
            pruned or parametrized layer).
        input_sizes: spatial input size per conv name (``nn.Linear`` needs none).
        stats: ``"full"``: every singular value and the statistics :data:`SPECTRUM_STATS` by
            :func:`module_spectrum`; ``"norm"``: ``sigma_max`` only, by the fast path
            :func:`module_spectral_norm`.
        method: full-spectrum method of :func:`conv_spectrum`: ``"svd"`` (default: the smallest
            singular values and the condition number accurate to ~1e-7 ``sigma_max`` in float32),
            ``"gram"`` (faster; values below ~1e-3 ``sigma_max`` only resolved to that floor in
            float32) or ``"auto"``.
        dtype: compute dtype (``None``: float32, float64 for float64 weights).
        states: with ``stats="norm"``, a dict of :class:`~lightning_struct.ops.spectral.warm.NormState`
            per layer name that the norms start from and that is updated in place (the warm path
            :func:`~lightning_struct.ops.spectral.warm.warm_conv_spectral_norm`; a layer without a
            state gets a cold run). ``None``: every norm from scratch.

    Returns:
        ``{name: LayerSpectrum}``. A layer whose weights hold NaN/inf gets NaN statistics and
        ``finite=False`` instead of an error.

    Raises:
        ValueError: a bad ``stats`` / ``method`` / ``dtype``, or a conv without an input size.
        TypeError: a layer that is not a Conv1d/2d/3d or Linear.
    """
    check_choice(stats, "stats", ("full", "norm"), "model_spectra")
    check_choice(method, "method", ("auto", "gram", "svd"), "model_spectra")
    names = stat_names(stats)
    out: dict[str, LayerSpectrum] = {}
    with torch.no_grad():
        for name, module in layers:
            if not isinstance(module, SUPPORTED_TYPES):
                raise TypeError(f"{name}: {type(module).__name__} is not supported (Conv1d/2d/3d, Linear)")
            t0 = time.perf_counter()
            weight = module.weight.detach()
            size = input_sizes.get(name) or None
            values = None
            finite = bool(torch.isfinite(weight).all())
            if not finite:
                st = {k: math.nan for k in names}
            elif stats == "full":
                spec = module_spectrum(module, size, method=method, dtype=dtype, weight=weight, name=name)
                st = spec.stats()
                values = spec.values()
            elif states is not None:
                norm, states[name] = module_warm_norm(
                    module, size, states.get(name), dtype=dtype, weight=weight, name=name
                )
                st = {"sigma_max": float(norm)}
            else:
                norm = module_spectral_norm(module, size, dtype=dtype, weight=weight, name=name)
                st = {"sigma_max": float(norm)}
            out[name] = LayerSpectrum(
                name=name,
                kind=type(module).__name__,
                weight_shape=tuple(weight.shape),
                input_size=tuple(size or ()),
                stats=st,
                values=values,
                finite=finite,
                seconds=time.perf_counter() - t0,
            )
    return out


def lipschitz_bound(spectra: Mapping[str, LayerSpectrum]) -> float:
    """Product of the layers' ``sigma_max``: an upper bound on the Lipschitz constant of a plain
    chain of these layers with 1-Lipschitz activations (NaN if a layer's norm is NaN)."""
    bound = 1.0
    for layer in spectra.values():
        bound *= layer.stats.get("sigma_max", math.nan)
    return bound
