"""Model surgery without a Trainer: convert layers to low-rank / ACDC / tied form, report, save, reload.

* :func:`convert` - replace selected layers in place, returns a :class:`ConversionReport`.
* :class:`ConversionOptions` - every conversion key, its default and its check (spelled once).
* :func:`select_candidates` - which layers a conversion would touch (checked before training).
* :func:`fold_back` - low-rank layers back to dense (exact).
* :func:`load_converted` - rebuild the structure recorded in a checkpoint, then load weights.
* :func:`restore_structure` - the same from ``LightningModule.on_load_checkpoint``.
* :func:`save_converted` - a ``{"state_dict", spec}`` file for models converted outside Lightning.
* :func:`get_spec` / :func:`apply_spec` - the conversion spec itself.

Inside: :mod:`.options`, :mod:`.probe` (calibration forward), :mod:`.costs`, one converter per
method (:mod:`.lowrank`, :mod:`.acdc`, :mod:`.tied`), :mod:`.builders` (the table that rebuilds a
spec), :mod:`.spec`, :mod:`.checkpoint`, :mod:`.report`. Nothing here imports Lightning or Hydra;
the two-phase form (fit, convert, fit) is Lightning glue in :mod:`lightning_struct.callbacks.two_phase`.
"""

from __future__ import annotations

from lightning_struct.surgery.checkpoint import load_converted, restore_structure, save_converted
from lightning_struct.surgery.conversion import CONVERTED_TYPES, convert, fold_back, select_candidates
from lightning_struct.surgery.options import METHODS, OPTION_KEYS, ConversionOptions
from lightning_struct.surgery.probe import calibration_inputs
from lightning_struct.surgery.report import ConversionReport, LayerReport
from lightning_struct.surgery.spec import SPEC_KEY, apply_entries, apply_spec, get_spec

__all__ = [
    "CONVERTED_TYPES",
    "METHODS",
    "OPTION_KEYS",
    "SPEC_KEY",
    "ConversionOptions",
    "ConversionReport",
    "LayerReport",
    "apply_entries",
    "apply_spec",
    "calibration_inputs",
    "convert",
    "fold_back",
    "get_spec",
    "load_converted",
    "restore_structure",
    "save_converted",
    "select_candidates",
]
