"""One announcement for every change of a model's structure during a run.

Conversion (:class:`~lightning_struct.StructuredConversion`), FFT swaps and reverts
(:class:`~lightning_struct.FFTConvolution`) replace modules of the running model. A callback
that holds layers would otherwise keep the dead modules (and log stale values for them).
The callback that changes the structure calls :func:`announce_structure_change` once; every
callback of the Trainer that defines ``on_structure_change(trainer, pl_module, changed)``
re-selects its layers there (``changed``: the qualified names of the replaced modules).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import lightning.pytorch as pl

__all__ = ["StructureAware", "announce_structure_change"]


@runtime_checkable
class StructureAware(Protocol):
    """A callback that follows structure changes of the model it works on."""

    def on_structure_change(self, trainer: pl.Trainer, pl_module: pl.LightningModule, changed: list[str]) -> None:
        """Re-select the layers after the modules named in ``changed`` were replaced."""


def announce_structure_change(trainer: pl.Trainer | None, pl_module: pl.LightningModule, changed: Sequence[str]) -> None:
    """Tell every structure-aware callback of ``trainer`` that ``changed`` modules were replaced."""
    if trainer is None or not changed:
        return
    names = list(changed)
    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(cb, StructureAware):
            cb.on_structure_change(trainer, pl_module, names)
