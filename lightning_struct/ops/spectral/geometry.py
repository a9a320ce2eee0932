"""Argument checks and the normalised geometry of one convolution (per group)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lightning_struct._checks import check_int


def _tuple(value: int | Sequence[int], d: int, name: str, minimum: int) -> tuple[int, ...]:
    if isinstance(value, bool):
        raise TypeError(f"{name}={value!r} must be an int or a sequence of {d} ints")
    if isinstance(value, int):
        out = (value,) * d
    elif isinstance(value, torch.Size | tuple | list):
        out = tuple(value)
    else:
        raise TypeError(f"{name}={value!r} must be an int or a sequence of {d} ints")
    if len(out) != d or any(not isinstance(v, int) or isinstance(v, bool) for v in out):
        raise ValueError(f"{name}={value!r} must be an int or a sequence of {d} ints (one per spatial dim)")
    if any(v < minimum for v in out):
        raise ValueError(f"{name}={value!r}: every entry must be >= {minimum}")
    return out


@dataclass(frozen=True)
class _Geom:
    """Normalised geometry of one convolution (per group)."""

    d: int
    n: tuple[int, ...]  # input spatial size
    s: tuple[int, ...]  # stride
    dil: tuple[int, ...]
    k: tuple[int, ...]  # kernel size
    g: int  # groups
    co: int  # output channels per group
    ci: int  # input channels per group

    @property
    def m(self) -> tuple[int, ...]:
        """Coarse (output) grid ``n / s``."""
        return tuple(n // s for n, s in zip(self.n, self.s))

    @property
    def S(self) -> int:
        return math.prod(self.s)

    @property
    def cols(self) -> int:
        return self.S * self.ci

    @property
    def r(self) -> int:
        """Singular values per frequency and group."""
        return min(self.co, self.cols)

    def grid(self, half: bool) -> tuple[int, ...]:
        m = self.m
        return m[:-1] + (m[-1] // 2 + 1,) if half else m


def _check_weight(weight: torch.Tensor, what: str = "weight", finite: bool = True) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.is_complex() or not weight.is_floating_point():
        raise TypeError(f"{what} must be a real floating-point tensor, got dtype {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError(f"{what} is empty (shape {tuple(weight.shape)})")
    if finite and not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{what} contains NaN or inf values; its spectrum is undefined")


def _geometry(
    weight: torch.Tensor,
    input_size: int | Sequence[int],
    stride: int | Sequence[int],
    dilation: int | Sequence[int],
    groups: int,
    check_finite: bool = True,
) -> _Geom:
    _check_weight(weight, finite=check_finite)
    if weight.ndim not in (3, 4, 5):
        raise ValueError(
            f"weight of shape {tuple(weight.shape)}: expected a Conv1d/2d/3d weight (C_out, C_in/groups, *kernel) "
            "with 1-3 spatial dims (use linear_spectrum for nn.Linear)"
        )
    d = weight.ndim - 2
    n = _tuple(input_size, d, "input_size", 1)
    s = _tuple(stride, d, "stride", 1)
    dil = _tuple(dilation, d, "dilation", 1)
    check_int(groups, "groups", minimum=1)
    c_out = weight.shape[0]
    if c_out % groups:
        raise ValueError(
            f"groups={groups} does not divide C_out={c_out} (weight shape {tuple(weight.shape)})"
        )
    for i, (ni, si) in enumerate(zip(n, s)):
        if ni % si:
            raise ValueError(
                f"input_size[{i}]={ni} is not divisible by stride[{i}]={si}: the periodic strided operator is "
                f"only defined on a multiple of the stride (e.g. input_size[{i}]={ni - ni % si or si})"
            )
    return _Geom(d, n, s, dil, tuple(weight.shape[2:]), groups, c_out // groups, weight.shape[1])


def _compute_dtype(weight: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is None:
        dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype={dtype}: allowed torch.float32 (default) or torch.float64")
    return dtype


def _complex(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def _half_indices(geom: _Geom, device: torch.device, half: bool) -> list[torch.Tensor]:
    """Coarse frequency indices per dim (the last one halved when ``half``)."""
    return [torch.arange(M, device=device) for M in geom.grid(half)]


def _multiplicity(geom: _Geom, device: torch.device) -> torch.Tensor:
    """1 or 2 per half-grid frequency (row-major), see the package docstring."""
    md = geom.m[-1]
    J = torch.arange(md // 2 + 1, device=device)
    last = torch.where((J == 0) | (2 * J == md), 1, 2)
    lead = math.prod(geom.m[:-1])
    return last.repeat(lead)
