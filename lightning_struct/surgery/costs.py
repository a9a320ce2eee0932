"""Costs of one layer: parameters and multiply-accumulates, dense and factorized."""

from __future__ import annotations

import math

from torch import nn

from lightning_struct.ops import factorize as fz

__all__ = ["acdc_flops", "dense_cost", "dense_flops", "lowrank_cost", "n_params", "rows_of"]


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def rows_of(shape: tuple[int, ...] | None) -> int:
    """Positions per example of a linear layer input ``(*, in)`` (batch dim already dropped)."""
    if shape is None:
        return 1
    return int(math.prod(shape[:-1])) if len(shape) > 1 else 1


def dense_flops(module: nn.Module, shape: tuple[int, ...] | None) -> int | None:
    if shape is None:
        return None
    if isinstance(module, nn.Conv2d):
        hw = fz.conv_out_hw(shape[-2:], module.kernel_size, module.stride, module.padding, module.dilation)  # type: ignore[arg-type]
        return fz.dense_conv_flops(module.weight.shape, hw)
    if isinstance(module, nn.Linear):
        return fz.dense_linear_flops(module.out_features, module.in_features, rows_of(shape))
    return None


def lowrank_cost(
    module: nn.Module, scheme: str, rank: int | tuple[int, int], shape: tuple[int, ...] | None, on: str
) -> int | None:
    bias = getattr(module, "bias", None) is not None
    if isinstance(module, nn.Conv2d):
        if on == "params":
            return fz.conv_factor_params(scheme, module.weight.shape, rank, module.groups, bias)
        if shape is None:
            return None
        return fz.conv_factor_flops(
            scheme,
            module.weight.shape,
            rank,
            shape[-2:],
            module.groups,
            module.stride,
            module.padding,
            module.dilation,  # type: ignore[arg-type]
        )
    assert isinstance(module, nn.Linear)
    if on == "params":
        return fz.linear_factor_params(module.out_features, module.in_features, int(rank), bias)  # type: ignore[arg-type]
    if shape is None:
        return None
    return fz.linear_factor_flops(module.out_features, module.in_features, int(rank), rows_of(shape))  # type: ignore[arg-type]


def dense_cost(module: nn.Module, shape: tuple[int, ...] | None, on: str) -> int | None:
    return n_params(module) if on == "params" else dense_flops(module, shape)


def acdc_flops(n_factors: int, size: int, rows: int) -> int:
    """Approximate MACs of an ACDC stack: per factor two diagonals and two N log2 N transforms."""
    return int(n_factors * rows * (2 * size + 2 * size * max(1, math.ceil(math.log2(max(size, 2))))))


