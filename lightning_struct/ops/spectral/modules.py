"""Adapters from ``nn.Conv1d/2d/3d`` and ``nn.Linear`` modules to the spectral ops.

Only the hyper-parameters and the weight of a module are read (stride, dilation, groups; padding
never changes the periodic operator); nothing is changed on it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lightning_struct.ops.spectral.full import Method, conv_spectrum, linear_spectrum
from lightning_struct.ops.spectral.geometry import _check_weight, _compute_dtype
from lightning_struct.ops.spectral.norm import conv_spectral_norm
from lightning_struct.ops.spectral.result import ConvSpectrum
from lightning_struct.ops.spectral.warm import NormState, warm_conv_spectral_norm, warm_linear_norm

__all__ = ["CONV_TYPES", "SUPPORTED_TYPES", "module_spectral_norm", "module_spectrum", "module_warm_norm"]

#: convolutions whose spectra the ops compute (periodic boundary at the layer's input size)
CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: every layer type of :func:`module_spectrum` / :func:`module_spectral_norm`
SUPPORTED_TYPES: tuple[type[nn.Module], ...] = (*CONV_TYPES, nn.Linear)


def _conv_args(module: nn.Module, input_size: Sequence[int] | int | None, name: str) -> dict[str, object]:
    if input_size is None:
        raise ValueError(
            f"{name}: input_size (the spatial size of the layer's input) is required for a convolution"
        )
    return dict(input_size=input_size, stride=module.stride, dilation=module.dilation, groups=module.groups)


def module_spectrum(
    module: nn.Module,
    input_size: Sequence[int] | int | None = None,
    *,
    method: Method = "auto",
    dtype: torch.dtype | None = None,
    weight: torch.Tensor | None = None,
    name: str = "layer",
) -> ConvSpectrum:
    """:func:`conv_spectrum` for an ``nn.Conv1d/2d/3d`` (periodic boundary at ``input_size``) or
    :func:`linear_spectrum` for an ``nn.Linear``. ``weight`` overrides ``module.weight`` (e.g. the
    effective weight of a parametrized layer). Raises ``TypeError`` for other modules."""
    w = module.weight if weight is None else weight
    if isinstance(module, nn.Linear):
        return linear_spectrum(w, dtype=dtype)
    if isinstance(module, CONV_TYPES):
        return conv_spectrum(w, method=method, dtype=dtype, **_conv_args(module, input_size, name))  # type: ignore[arg-type]
    raise TypeError(f"{name}: {type(module).__name__} is not supported (Conv1d/2d/3d, Linear)")


def module_spectral_norm(
    module: nn.Module,
    input_size: Sequence[int] | int | None = None,
    *,
    dtype: torch.dtype | None = None,
    weight: torch.Tensor | None = None,
    name: str = "layer",
) -> torch.Tensor:
    """:func:`conv_spectral_norm` / the largest singular value of an ``nn.Linear`` weight, 0-d."""
    w = module.weight if weight is None else weight
    if isinstance(module, nn.Linear):
        _check_weight(w)
        rdt = _compute_dtype(w, dtype)
        return torch.linalg.matrix_norm(w.detach().to(rdt), ord=2)
    if isinstance(module, CONV_TYPES):
        return conv_spectral_norm(w, dtype=dtype, **_conv_args(module, input_size, name))  # type: ignore[arg-type]
    raise TypeError(f"{name}: {type(module).__name__} is not supported (Conv1d/2d/3d, Linear)")


def module_warm_norm(
    module: nn.Module,
    input_size: Sequence[int] | int | None,
    state: NormState | None,
    *,
    dtype: torch.dtype | None = None,
    weight: torch.Tensor | None = None,
    name: str = "layer",
) -> tuple[torch.Tensor, NormState]:
    """:func:`module_spectral_norm` warm from the ``state`` of the last call on this layer
    (:func:`warm_conv_spectral_norm` / :func:`warm_linear_norm`); returns the norm and the new state."""
    w = module.weight if weight is None else weight
    if isinstance(module, nn.Linear):
        return warm_linear_norm(w, state=state, dtype=dtype)
    if isinstance(module, CONV_TYPES):
        return warm_conv_spectral_norm(w, state=state, dtype=dtype, **_conv_args(module, input_size, name))  # type: ignore[arg-type]
    raise TypeError(f"{name}: {type(module).__name__} is not supported (Conv1d/2d/3d, Linear)")
