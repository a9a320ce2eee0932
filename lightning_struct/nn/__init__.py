"""nn.Modules built on :mod:`lightning_struct.ops`."""

from __future__ import annotations

import importlib
from typing import Any

# public name -> defining module (imported on first access, so `import lightning_struct.nn` stays cheap)
_EXPORTS: dict[str, str] = {
    "FFTConv1d": "lightning_struct.nn.fftconv",
    "FFTConv2d": "lightning_struct.nn.fftconv",
    "FFTConvNd": "lightning_struct.nn.fftconv",
    "LowRankConv2d": "lightning_struct.nn.lowrank",
    "LowRankLinear": "lightning_struct.nn.lowrank",
    "ACDC": "lightning_struct.nn.acdc",
    "ACDCStack": "lightning_struct.nn.acdc",
    "ACDCConv1x1": "lightning_struct.nn.acdc",
    "MonarchLinear": "lightning_struct.nn.monarch",
    "ButterflyLinear": "lightning_struct.nn.monarch",
    "TiedBottleneck": "lightning_struct.nn.tied",
    "TiedMLP": "lightning_struct.nn.tied",
    "eval_mode": "lightning_struct.nn.utils",
    "set_submodule": "lightning_struct.nn.utils",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lightning_struct.nn' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
