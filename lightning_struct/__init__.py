"""lightning-struct: Lightning callbacks that make networks structurally cheaper, and show why.

Public API (imported lazily, so ``import lightning_struct`` stays cheap):

* :class:`ForceRegularization` - filter coordination (Wen et al. 2017)
* :class:`SpectralMonitor` - exact conv spectra by Local Fourier Analysis
* :class:`StructuredConversion` - low-rank / ACDC / tied conversion, then fine-tune
* :class:`FFTConvolution` - per-layer autotuned FFT convolution
* :class:`Resumable`, :class:`ResumableLoader` - graceful Ctrl+C / SIGTERM and exact mid-epoch resume
* :func:`convert`, :func:`load_converted`, :func:`fold_back`, :func:`save_converted`,
  :func:`restore_structure`, :class:`ConversionOptions` - model surgery outside a Trainer
* :func:`fit_convert_finetune` - fit, convert, fine-tune with a fresh Trainer (every strategy)
* :func:`export` - ONNX / ExportedProgram / TorchScript of any (converted) network, checked against eager
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "ForceRegularization": "lightning_struct.callbacks.force",
    "SpectralMonitor": "lightning_struct.callbacks.spectral",
    "StructuredConversion": "lightning_struct.callbacks.conversion",
    "FFTConvolution": "lightning_struct.callbacks.fftconv",
    "Resumable": "lightning_struct.callbacks.resume",
    "ResumableLoader": "lightning_struct.data.loader",
    "convert": "lightning_struct.surgery",
    "load_converted": "lightning_struct.surgery",
    "fold_back": "lightning_struct.surgery",
    "save_converted": "lightning_struct.surgery",
    "restore_structure": "lightning_struct.surgery",
    "ConversionOptions": "lightning_struct.surgery",
    "fit_convert_finetune": "lightning_struct.callbacks.two_phase",
    "export": "lightning_struct.deploy",
    "ImageClassifier": "lightning_struct.models",
    "DigitsDataModule": "lightning_struct.data",
    "ImageFolderDataModule": "lightning_struct.data",
}

__all__ = [
    "ConversionOptions",
    "DigitsDataModule",
    "FFTConvolution",
    "ForceRegularization",
    "ImageClassifier",
    "ImageFolderDataModule",
    "Resumable",
    "ResumableLoader",
    "SpectralMonitor",
    "StructuredConversion",
    "__version__",
    "convert",
    "export",
    "fit_convert_finetune",
    "fold_back",
    "load_converted",
    "restore_structure",
    "save_converted",
]

if TYPE_CHECKING:  # pragma: no cover
    from lightning_struct.callbacks.conversion import StructuredConversion
    from lightning_struct.callbacks.fftconv import FFTConvolution
    from lightning_struct.callbacks.force import ForceRegularization
    from lightning_struct.callbacks.resume import Resumable
    from lightning_struct.callbacks.spectral import SpectralMonitor
    from lightning_struct.callbacks.two_phase import fit_convert_finetune
    from lightning_struct.data import DigitsDataModule, ImageFolderDataModule
    from lightning_struct.data.loader import ResumableLoader
    from lightning_struct.deploy import export
    from lightning_struct.models import ImageClassifier
    from lightning_struct.surgery import (
        ConversionOptions,
        convert,
        fold_back,
        load_converted,
        restore_structure,
        save_converted,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_struct' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
