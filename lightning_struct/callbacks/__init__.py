"""Lightning glue: each callback picks layers, calls ``ops``/``nn``/``convert``, and logs."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ForceRegularization": "lightning_struct.callbacks.force",
    "SpectralMonitor": "lightning_struct.callbacks.spectral",
    "StructuredConversion": "lightning_struct.callbacks.conversion",
    "ConversionCheckpoint": "lightning_struct.callbacks.conversion",
    "FFTConvolution": "lightning_struct.callbacks.fftconv",
    "Resumable": "lightning_struct.callbacks.resume",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lightning_struct.callbacks' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
