"""What one conversion works on: the candidate layers, the probe, and what it produces."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lightning_struct.surgery.options import ConversionOptions
from lightning_struct.surgery.probe import Probe
from lightning_struct.surgery.report import LayerReport

__all__ = ["Context"]


@dataclass
class Context:
    """Shared by the per-method converters (:mod:`.lowrank`, :mod:`.acdc`, :mod:`.tied`).

    Attributes:
        options: the validated conversion options.
        candidates: ``(name, module)`` pairs selected for conversion.
        exact: names given without wildcards in ``include`` (an unconvertible one is an error).
        probe: what the calibration forward saw (shapes; inputs/outputs when ``have_data``).
        have_data: real calibration inputs were recorded (not only a shape-probe).
        rows: one report row per candidate, appended by the converter.
        new_modules: ``(name, new module, spec entry)`` for every layer to swap in.
    """

    options: ConversionOptions
    candidates: list[tuple[str, nn.Module]]
    exact: set[str]
    probe: Probe
    have_data: bool
    rows: list[LayerReport] = field(default_factory=list)
    new_modules: list[tuple[str, nn.Module, dict[str, Any]]] = field(default_factory=list)

    def dense_row(self, name: str, module: nn.Module, with_flops: bool = True) -> LayerReport:
        """A row for a layer that is still dense (the converter fills in what changes)."""
        from lightning_struct.surgery.costs import dense_flops, n_params

        shape = self.probe.in_shapes.get(name)
        flops = dense_flops(module, shape) if with_flops else None
        row = LayerReport(
            name=name, kind="dense", status="converted", params_before=n_params(module),
            params_after=n_params(module), flops_before=flops, flops_after=flops,
        )  # fmt: skip
        self.rows.append(row)
        return row
