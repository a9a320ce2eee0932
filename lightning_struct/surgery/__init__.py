"""Model surgery: convert trained layers to low-rank / ACDC / tied form, report, save and reload.

* :func:`convert` - replace selected layers in place, returns a :class:`ConversionReport`.
* :func:`fold_back` - low-rank layers back to dense (exact).
* :func:`load_converted` - rebuild the structure recorded in a checkpoint, then load weights.
* :func:`restore_structure` - the same from ``LightningModule.on_load_checkpoint``.
* :func:`save_converted` - a ``{"state_dict", spec}`` file for models converted outside Lightning.
* :func:`get_spec` / :func:`apply_spec` - the conversion spec itself.
* :func:`~lightning_struct.convert.two_phase.fit_convert_finetune` - fit, convert, fine-tune
  with a fresh Trainer (the form that works under every strategy, DDP included).
"""

from __future__ import annotations

import sys
import types
from typing import Any

from lightning_struct.convert.checkpoint import load_converted, restore_structure, save_converted
from lightning_struct.convert.report import ConversionReport, LayerReport
from lightning_struct.convert.spec import SPEC_KEY, apply_spec, get_spec
from lightning_struct.convert.surgery import METHODS, calibration_inputs, convert, fold_back

__all__ = [
    "METHODS",
    "SPEC_KEY",
    "ConversionReport",
    "LayerReport",
    "apply_spec",
    "calibration_inputs",
    "convert",
    "fold_back",
    "get_spec",
    "load_converted",
    "restore_structure",
    "save_converted",
]


class _CallableModule(types.ModuleType):
    """``lightning_struct.convert`` is both this package and the function :func:`convert`.

    Importing a submodule (``lightning_struct.convert.two_phase``) binds the *package* to the
    attribute ``lightning_struct.convert``, shadowing the lazily exported function; calling the
    package forwards to :func:`convert`, so ``lightning_struct.convert(model, ...)`` and
    ``from lightning_struct import convert`` work whatever was imported first.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> ConversionReport:
        return convert(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
