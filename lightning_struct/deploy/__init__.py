"""Deploying what the callbacks made: fold, export, check, time.

* :func:`export` - ONNX / ExportedProgram / TorchScript, checked against the eager model on fresh
  inputs of other batch and spatial sizes, refused when it disagrees.
* :mod:`.fold` - FFT convs back to ``Conv2d``, BatchNorm into the preceding conv, converted layers
  back to dense.
* :mod:`.runtime` - onnxruntime sessions and timing.
"""

from __future__ import annotations

from lightning_struct.deploy.export import FORMATS, ExportMismatchError, ExportResult, export
from lightning_struct.deploy.fold import fold_batchnorm, fold_dense, fold_fft

__all__ = ["FORMATS", "ExportMismatchError", "ExportResult", "export", "fold_batchnorm", "fold_dense", "fold_fft"]
