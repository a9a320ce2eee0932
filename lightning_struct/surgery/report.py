"""What a conversion did: per-layer and total parameters, FLOPs and approximation errors."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["ConversionReport", "LayerReport"]


@dataclass
class LayerReport:
    """One selected layer.

    Attributes:
        name: qualified name in the converted model.
        kind: ``"lowrank_conv2d"``, ``"lowrank_linear"``, ``"acdc_linear"``, ``"acdc_conv1x1"``,
            ``"tied_bottleneck"``, ``"tied_mlp"``, or ``"dense"`` when the layer was kept.
        status: ``"converted"`` or why the layer was kept dense.
        detail: the hyper-parameters chosen (scheme, rank, n_factors ...).
        params_before, params_after: parameters of the layer (weights + biases).
        flops_before, flops_after: multiply-accumulates per example, ``None`` without input shapes.
        weight_rel_error: ``||W - W_approx||_F / ||W||_F`` of the layer's (effective) weight,
            ``None`` where the replacement has no dense equivalent to compare.
        output_rel_error: ``||y - y_approx|| / ||y||`` of the layer's output on the calibration
            inputs (the dense model's inputs to that layer; with ``sequential=True`` the inputs it
            gets in the converted network, against the dense layer's output in the dense network),
            ``None`` without calibration.
    """

    name: str
    kind: str
    status: str
    detail: dict[str, Any] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    flops_before: int | None = None
    flops_after: int | None = None
    weight_rel_error: float | None = None
    output_rel_error: float | None = None


@dataclass
class ConversionReport:
    """Result of :func:`lightning_struct.surgery.convert`.

    Attributes:
        method: ``"lowrank"``, ``"acdc"``, ``"tied"`` or ``"fold"``.
        params_before, params_after: parameters of the whole model before / after.
        flops_before, flops_after: multiply-accumulates per example of every conv / linear layer
            of the model (plus the replacements) before / after; ``None`` without input shapes.
        layers: one :class:`LayerReport` per selected layer (converted or kept dense).
        output_rel_error: relative error of the whole model's output on the calibration batch
            (``None`` without calibration).
        spec: the entries added to the conversion spec.
        latency_ratio: the converted network's measured forward time over the dense network's
            (interleaved medians, batch ``speed_batch``, eager), with ``budget_on="latency"`` or
            ``speed_check="eager"``; ``None`` otherwise.
    """

    method: str
    params_before: int
    params_after: int
    flops_before: int | None = None
    flops_after: int | None = None
    layers: list[LayerReport] = field(default_factory=list)
    output_rel_error: float | None = None
    spec: list[dict[str, Any]] = field(default_factory=list)
    latency_ratio: float | None = None  # budget_on="latency" or speed_check="eager": measured converted / dense forward time

    @property
    def converted(self) -> list[LayerReport]:
        """The layers that were replaced."""
        return [r for r in self.layers if r.status == "converted"]

    @property
    def param_ratio(self) -> float:
        """``params_before / params_after`` of the whole model."""
        return self.params_before / max(self.params_after, 1)

    @property
    def flop_ratio(self) -> float | None:
        """``flops_before / flops_after`` (``None`` without shapes)."""
        if self.flops_before is None or self.flops_after is None:
            return None
        return self.flops_before / max(self.flops_after, 1)

    def scalars(self, prefix: str = "conversion/") -> dict[str, float]:
        """Totals as plain floats for ``logger.log_metrics``."""
        out: dict[str, float] = {
            f"{prefix}params_before": float(self.params_before),
            f"{prefix}params_after": float(self.params_after),
            f"{prefix}param_ratio": float(self.param_ratio),
            f"{prefix}layers_converted": float(len(self.converted)),
        }
        if self.flops_before is not None and self.flops_after is not None:
            out[f"{prefix}flops_before"] = float(self.flops_before)
            out[f"{prefix}flops_after"] = float(self.flops_after)
            out[f"{prefix}flop_ratio"] = float(self.flop_ratio or 0.0)
        if self.output_rel_error is not None:
            out[f"{prefix}output_rel_error"] = float(self.output_rel_error)
        if self.latency_ratio is not None:
            out[f"{prefix}latency_ratio"] = float(self.latency_ratio)
        return out

    COLUMNS = (
        "layer",
        "kind",
        "status",
        "detail",
        "params_before",
        "params_after",
        "flops_before",
        "flops_after",
        "weight_rel_error",
        "output_rel_error",
    )

    def rows(self) -> list[list[Any]]:
        """One row per layer, in :attr:`COLUMNS` order (for ``wandb.Table``)."""
        return [
            [
                r.name,
                r.kind,
                r.status,
                ", ".join(f"{k}={v}" for k, v in r.detail.items()),
                r.params_before,
                r.params_after,
                r.flops_before,
                r.flops_after,
                r.weight_rel_error,
                r.output_rel_error,
            ]
            for r in self.layers
        ]

    def to_dict(self) -> dict[str, Any]:
        """Plain-type dictionary (JSON-serialisable)."""
        return asdict(self)

    def __str__(self) -> str:
        def fmt(v: Any) -> str:
            if v is None:
                return "-"
            if isinstance(v, float):
                return f"{v:.4f}"
            return str(v)

        lines = [
            f"conversion '{self.method}': params {self.params_before:,} -> {self.params_after:,} "
            f"({self.param_ratio:.2f}x)"
            + (
                f", FLOPs {self.flops_before:,} -> {self.flops_after:,} ({self.flop_ratio:.2f}x)"
                if self.flop_ratio is not None
                else ""
            )
            + (
                f", output rel. error {self.output_rel_error:.4f}"
                if self.output_rel_error is not None
                else ""
            )
        ]
        width = max([len(r.name) for r in self.layers] + [5])
        swidth = max([len(r.status) for r in self.layers] + [6])
        dwidth = max([len(", ".join(f"{k}={v}" for k, v in r.detail.items())) for r in self.layers] + [6])
        header = (
            f"  {'layer':<{width}}  {'status':<{swidth}}  {'detail':<{dwidth}}  {'params before':>13} "
            f"{'after':>11}  {'w_err':>7} {'y_err':>7}"
        )
        lines.append(header)
        for r in self.layers:
            detail = ", ".join(f"{k}={v}" for k, v in r.detail.items())
            lines.append(
                f"  {r.name:<{width}}  {r.status:<{swidth}}  {detail:<{dwidth}}  {r.params_before:>13,} "
                f"{r.params_after:>11,}  {fmt(r.weight_rel_error):>7} {fmt(r.output_rel_error):>7}"
            )
        return "\n".join(lines)
