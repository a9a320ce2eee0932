"""The brute-force reference: the dense matrix of a convolution (tests, small layers, zero padding)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from lightning_struct.ops.spectral._pool import cpu_single_threaded
from lightning_struct.ops.spectral.geometry import _geometry

__all__ = ["explicit_conv_matrix"]


@cpu_single_threaded
def explicit_conv_matrix(
    weight: torch.Tensor,
    input_size: Sequence[int] | int,
    *,
    stride: int | Sequence[int] = 1,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    padding_mode: Literal["circular", "zeros"] = "circular",
) -> torch.Tensor:
    """The dense matrix of the convolution, built by pushing basis vectors through ``F.conv*d``.

    Columns are the flattened outputs for unit inputs: ``(C_out * prod(out), C_in * prod(n))``.
    ``padding_mode="circular"`` pads ``(k-1)*dil`` on the right (periodic operator, output size
    ``n / s``); ``"zeros"`` uses "same"-style zero padding ``(k-1)*dil // 2`` on both sides.
    Memory ``O(C^2 N^2)``: small layers only.
    """
    geom = _geometry(weight, input_size, stride, dilation, groups)
    d = geom.d
    C_in = geom.ci * geom.g
    N = math.prod(geom.n)
    eye = torch.eye(C_in * N, dtype=weight.dtype, device=weight.device).reshape(C_in * N, C_in, *geom.n)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[d]
    if padding_mode == "circular":
        pad: list[int] = []
        for i in reversed(range(d)):
            pad += [0, (geom.k[i] - 1) * geom.dil[i]]
        x = F.pad(eye, pad, mode="circular") if any(pad) else eye
        y = conv(x, weight, stride=geom.s, dilation=geom.dil, groups=geom.g)
    elif padding_mode == "zeros":
        padding = tuple((geom.k[i] - 1) * geom.dil[i] // 2 for i in range(d))
        y = conv(eye, weight, stride=geom.s, dilation=geom.dil, groups=geom.g, padding=padding)
    else:
        raise ValueError(f"padding_mode={padding_mode!r}; allowed: 'circular', 'zeros'")
    return y.reshape(C_in * N, -1).T.contiguous()
