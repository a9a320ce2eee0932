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
        latency_ratio: ``budget_on="latency"``: a function timing the model with some layers
            replaced (``{name: module}``) against the dense model, interleaved; returns the ratio.
        measured_ratio: that ratio for the allocation finally chosen.
        inputs_after: ``sequential=True``: a function ``(name, {name: new module})`` returning the
            inputs layer ``name`` receives on the calibration batches with those layers replaced.
        fit_inputs: ``sequential=True``: per converted layer, the inputs it was fitted on (its
            output error is measured on them, against the dense layer on the dense inputs).
    """

    options: ConversionOptions
    candidates: list[tuple[str, nn.Module]]
    exact: set[str]
    probe: Probe
    have_data: bool
    rows: list[LayerReport] = field(default_factory=list)
    new_modules: list[tuple[str, nn.Module, dict[str, Any]]] = field(default_factory=list)
    latency_ratio: Any = None  # budget_on="latency": {name: module} -> measured converted/dense time
    measured_ratio: float | None = None  # what the chosen allocation measured
    inputs_after: Any = None  # sequential=True: (name, {name: module}) -> that layer's inputs
    fit_inputs: dict[str, list[Any]] = field(default_factory=dict)  # sequential=True: the inputs each layer was fitted on

    def module(self, name: str) -> nn.Module:
        """The dense candidate layer called ``name``."""
        return dict(self.candidates)[name]

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

    def not_worth_it(self, row: LayerReport, params_after: int | None, flops_after: int | None) -> str | None:
        """Why a replacement costing ``params_after``/``flops_after`` is not made, or ``None``.

        It must save at least ``options.min_saving`` of the layer's parameters and must not add
        FLOPs (when both FLOP counts are known): a conversion never makes the model worse.
        """
        before = row.params_before
        if params_after is not None and before and params_after > (1.0 - self.options.min_saving) * before:
            saved = 1.0 - params_after / before
            if saved <= 0:
                return "kept dense: factorized cost not lower"
            return f"kept dense: saves {saved:.1%} of the parameters (< min_saving={self.options.min_saving:g})"
        if flops_after is not None and row.flops_before is not None and flops_after > row.flops_before:
            return f"kept dense: more FLOPs ({row.flops_before:,} -> {flops_after:,})"
        return None

