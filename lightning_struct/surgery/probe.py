"""Calibration: input tensors from user batches, and one recording forward pass.

The probe runs the calibration batches through the model in eval mode without gradients and
records each layer's per-example input shape (for FLOPs) and, for the layers being converted,
their inputs and outputs (for output errors and the ACDC fit).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_struct.nn.utils import eval_mode

__all__ = ["Probe", "calibration_inputs", "device_of", "first_tensor", "probe", "rel_err"]


def _batch_input(batch: Any) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    if isinstance(batch, dict):
        for key in ("x", "input", "inputs", "image", "images", "pixel_values"):
            if isinstance(batch.get(key), Tensor):
                return batch[key]
    raise TypeError(
        f"calibration batch of type {type(batch).__name__} has no input tensor; pass a Tensor, a batch "
        f"tuple (x, ...), a dict with key 'x', or an iterable (DataLoader) of those"
    )


def calibration_inputs(calibration: Any, max_batches: int | None = None) -> list[Tensor]:
    """Input tensors from ``calibration``.

    Accepts a Tensor (one batch), a batch tuple/list ``(x, y, ...)`` (one batch), a dict with an
    input key, or an iterable of such batches (a ``DataLoader``, a list of tuples). At most
    ``max_batches`` batches are taken from an iterable.
    """
    if calibration is None:
        return []
    if isinstance(calibration, (Tensor, dict)) or (
        isinstance(calibration, (tuple, list)) and calibration and isinstance(calibration[0], Tensor)
    ):
        return [_batch_input(calibration)]
    if not isinstance(calibration, Iterable):
        raise TypeError(
            f"calibration must be a Tensor, a batch or an iterable of batches, got {type(calibration)}"
        )
    out = []
    for i, batch in enumerate(calibration):
        if max_batches is not None and i >= max_batches:
            break
        out.append(_batch_input(batch))
    if not out:
        raise ValueError("calibration iterable yielded no batch")
    return out


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@dataclass
class Probe:
    """What the calibration forward saw."""

    in_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # per example (batch dim dropped)
    inputs: dict[str, list[Tensor]] = field(default_factory=dict)
    outputs: dict[str, list[Tensor]] = field(default_factory=dict)
    model_out: list[Tensor] = field(default_factory=list)


def first_tensor(x: Any) -> Tensor | None:
    """``x`` itself, or the first element of a tuple/list of tensors (``None`` otherwise)."""
    if isinstance(x, Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], Tensor):
        return x[0]
    return None


@torch.no_grad()
def probe(
    model: nn.Module,
    batches: list[Tensor],
    shape_modules: Sequence[tuple[str, nn.Module]],
    keep_modules: Sequence[tuple[str, nn.Module]],
) -> Probe:
    """Run ``batches`` (eval mode) recording input shapes and the selected layers' inputs/outputs."""
    seen_by = Probe()
    keep = {id(m) for _, m in keep_modules}
    handles = []

    def make_hook(name: str, module: nn.Module) -> Any:
        def hook(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            x = first_tensor(args)
            if x is None:
                return
            seen_by.in_shapes.setdefault(name, tuple(x.shape[1:]))
            if id(module) in keep:
                y = first_tensor(out)
                # clones: later in-place ops (ReLU(inplace=True)) would overwrite the recorded tensors
                seen_by.inputs.setdefault(name, []).append(x.detach().clone())
                if y is not None:
                    seen_by.outputs.setdefault(name, []).append(y.detach().clone())

        return hook

    seen = set()
    for name, module in list(shape_modules) + list(keep_modules):
        if name in seen:
            continue
        seen.add(name)
        handles.append(module.register_forward_hook(make_hook(name, module)))
    device = device_of(model)
    try:
        with eval_mode(model):
            for x in batches:
                y = first_tensor(model(x.to(device)))
                if y is not None:
                    seen_by.model_out.append(y.detach().clone())
    finally:
        for h in handles:
            h.remove()
    return seen_by


def rel_err(a: Tensor, b: Tensor) -> float:
    """``||a - b|| / ||b||`` in float64 (0 when both are zero)."""
    a64, b64 = a.detach().double(), b.detach().double()
    den = float(b64.norm())
    num = float((a64 - b64).norm())
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den
