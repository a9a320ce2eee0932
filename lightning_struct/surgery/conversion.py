"""The entry points of model surgery: :func:`convert`, :func:`select_candidates`, :func:`fold_back`.

:func:`convert` edits the model in place: it selects the layers (:func:`select_candidates`),
runs one calibration forward (:mod:`.probe`), hands the candidates to the method's converter
(:mod:`.lowrank`, :mod:`.acdc`, :mod:`.tied`), measures the output errors while the dense layers
are still in place, swaps the new modules in, records them in the model's conversion spec
(:mod:`.spec`) and returns a :class:`~lightning_struct.surgery.report.ConversionReport`.
A layer whose factorized cost is not lower than the dense cost always stays dense.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lightning_struct.nn.acdc import ACDC, ACDCConv1x1, ACDCStack
from lightning_struct.nn.lowrank import LowRankConv2d, LowRankLinear
from lightning_struct.nn.tied import TiedBottleneck, TiedMLP
from lightning_struct.nn.utils import eval_mode
from lightning_struct.select import exclude_ends, resolve_types, select_layers
from lightning_struct.surgery import spec as specmod
from lightning_struct.surgery._context import Context
from lightning_struct.surgery.acdc import acdc_support, convert_acdc
from lightning_struct.surgery.costs import dense_flops, n_params
from lightning_struct.surgery.lowrank import convert_lowrank
from lightning_struct.surgery.options import ConversionOptions
from lightning_struct.surgery.probe import Probe, calibration_inputs, device_of, first_tensor, probe, rel_err
from lightning_struct.surgery.report import ConversionReport, LayerReport
from lightning_struct.surgery.tied import convert_tied, tied_support

log = logging.getLogger(__name__)

__all__ = ["CONVERTED_TYPES", "convert", "fold_back", "select_candidates"]

#: module types produced by a conversion; layers inside them are never selected again
CONVERTED_TYPES: tuple[type, ...] = (LowRankConv2d, LowRankLinear, ACDC, ACDCStack, ACDCConv1x1, TiedBottleneck, TiedMLP)

_CONVERTERS: dict[str, Callable[[Context], None]] = {
    "lowrank": convert_lowrank,
    "acdc": convert_acdc,
    "tied": convert_tied,
}


def _default_types(method: str) -> tuple[type, ...]:
    if method in ("lowrank", "acdc"):
        return (nn.Conv2d, nn.Linear)
    from torchvision.models.resnet import Bottleneck
    from torchvision.models.vision_transformer import MLPBlock

    return (Bottleneck, MLPBlock)


def _exact_names(include: str | Sequence[str] | None) -> set[str]:
    if include is None:
        return set()
    pats = [include] if isinstance(include, str) else list(include)
    return {p for p in pats if not set("*?[") & set(p)}


def _options(method: str | ConversionOptions, options: dict[str, Any]) -> ConversionOptions:
    if isinstance(method, ConversionOptions):
        return method.replace(**options) if options else method
    return ConversionOptions.from_mapping({"method": method, **options})


def select_candidates(
    model: nn.Module, method: str | ConversionOptions, **options: Any
) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, str]]]:
    """The layers :func:`convert` would hand to the method, and those it would keep dense.

    Checks the whole selection without touching the model (callbacks call it at fit start):
    include/exclude patterns that match nothing, exactly named layers of an unsupported type
    or shape. Layers already converted (and layers inside them) are never selected again.

    Returns:
        ``(candidates, unsupported)``: ``(name, module)`` pairs to convert, and ``(name, why)``
        for selected layers that the method cannot replace (kept dense by :func:`convert`).

    Raises:
        ValueError: a pattern matching nothing, or an exactly named layer that cannot be converted.
    """
    opts = _options(method, options)
    where = f"convert(method={opts.method!r})"
    layer_types = resolve_types(opts.types, _default_types(opts.method))
    exclude, ends = exclude_ends(model, opts.include, opts.exclude)  # stem and classifier, as the force
    if ends:
        log.info("%s: leaving the first conv and the classifier dense by default (%s); name them in include= to convert them", where, ", ".join(ends))
    selected = select_layers(model, layer_types, opts.include, exclude or None, what=where)
    inside = [n for n, m in model.named_modules() if n and isinstance(m, CONVERTED_TYPES)]
    candidates = [
        (n, m)
        for n, m in selected
        if not isinstance(m, CONVERTED_TYPES) and not any(n.startswith(c + ".") for c in inside)
    ]
    support = {"acdc": acdc_support, "tied": tied_support}.get(opts.method)
    unsupported: list[tuple[str, str]] = []
    if support is not None:
        exact = _exact_names(opts.include)
        for name, m in candidates:
            why = support(name, m)
            if why is None:
                continue
            if name in exact:
                msg = why if opts.method == "acdc" else f"layer {name!r} cannot be tied: {why}"
                raise ValueError(f"{where}: {msg}")
            unsupported.append((name, why))
    return candidates, unsupported


def convert(
    model: nn.Module, method: str | ConversionOptions = "lowrank", *, calibration: Any = None, **options: Any
) -> ConversionReport:
    """Replace selected layers of ``model`` in place and report what changed.

    Args:
        model: any ``nn.Module`` (a LightningModule works; names are relative to it).
        method: ``"lowrank"``, ``"acdc"`` or ``"tied"``, or a whole
            :class:`~lightning_struct.surgery.options.ConversionOptions`.
        calibration: a batch, a Tensor, or an iterable of batches (``DataLoader``): gives input
            shapes (FLOPs), output errors and the ACDC fitting data. Run in eval mode, no grad.
        **options: the keys of :class:`~lightning_struct.surgery.options.ConversionOptions`
            (``energy``, ``ratio``, ``rank``, ``budget``, ``budget_on``, ``include``, ``exclude``,
            ``types``, ``scheme``, ``rank_multiple``, ``calibration_batches``, ``input_size``,
            ``acdc_*``, ``tied_staged``, ``seed``), documented there.

    Returns:
        A :class:`ConversionReport` (``params_before``/``params_after`` of the whole model,
        per-layer rows). The replacements are appended to the model's conversion spec.

    Raises:
        ValueError: bad method/rule/arguments, an include pattern matching nothing, or an
            exactly named layer that cannot be converted (e.g. a 3x3 conv for ACDC, a
            downsampling bottleneck for tied).
    """
    opts = _options(method, options)
    candidates, _ = select_candidates(model, opts)

    # ---- calibration forward: shapes (FLOPs), dense layer inputs/outputs, model output
    batches = calibration_inputs(calibration, opts.calibration_batches)
    have_data = bool(batches)
    if not batches and opts.input_size is not None:
        batches = [torch.zeros(1, *[int(s) for s in opts.input_size], device=device_of(model))]
    shape_modules = [
        (n, m)
        for n, m in model.named_modules()
        if n and isinstance(m, (nn.Conv2d, nn.Linear)) and not isinstance(m, CONVERTED_TYPES)
    ]
    seen = probe(model, batches, shape_modules, candidates if have_data else []) if batches else Probe()
    params_before = n_params(model)
    flops_all = [dense_flops(m, seen.in_shapes.get(n)) for n, m in shape_modules]
    flops_before = int(sum(f for f in flops_all if f is not None)) if batches else None

    ctx = Context(opts, candidates, _exact_names(opts.include), seen, have_data)
    if opts.sequential:
        ctx.inputs_after = _inputs_after(model, batches, seen)
    if opts.budget is not None and opts.budget_on == "latency":
        if not batches:
            raise ValueError("convert: budget_on='latency' needs input shapes: give calibration= or input_size=")
        ctx.latency_ratio = _latency_ratio(model, batches[0], opts)
    _CONVERTERS[opts.method](ctx)
    if opts.speed_check is not None:
        if not batches:
            raise ValueError(f"convert: speed_check={opts.speed_check!r} needs input shapes: give calibration= or input_size=")
        _keep_only_faster(model, ctx, batches[0])
        if opts.speed_check == "eager" and ctx.measured_ratio is None and ctx.new_modules:
            # every rank rule reports what the whole network measures (the latency budget already did)
            ctx.measured_ratio = _latency_ratio(model, batches[0], opts)({n: m for n, m, _ in ctx.new_modules})
    if have_data:
        _output_errors(ctx)

    # ---- swap
    entries = []
    for name, new, entry in ctx.new_modules:
        old = specmod.replace_module(model, name, new)
        new.train(old.training)
        entries.append(dict(entry, name=name))
    specmod.record(model, entries)

    report = ConversionReport(
        method=opts.method, params_before=params_before, params_after=n_params(model), layers=ctx.rows, spec=entries,
        latency_ratio=ctx.measured_ratio,
    )  # fmt: skip
    if flops_before is not None:
        delta = sum((r.flops_after or 0) - (r.flops_before or 0) for r in ctx.rows if r.status == "converted")
        report.flops_before = flops_before
        report.flops_after = flops_before + delta
    if have_data and seen.model_out:
        device = device_of(model)
        with torch.no_grad(), eval_mode(model):
            outs = [first_tensor(model(x.to(device))) for x in batches]
        report.output_rel_error = rel_err(
            torch.cat([o.flatten() for o in outs if o is not None]),
            torch.cat([o.flatten() for o in seen.model_out]),
        )
    log.debug("%s", report)
    return report


def speed_input(batch: torch.Tensor, size: int) -> torch.Tensor:
    """A batch of ``size`` rows made from ``batch`` (repeated when it is smaller)."""
    reps = -(-size // batch.shape[0])
    return batch.repeat(reps, *([1] * (batch.dim() - 1)))[:size]


def _latency_ratio(model: nn.Module, batch: torch.Tensor, opts: ConversionOptions) -> Callable[[dict[str, nn.Module]], float]:
    """A function timing ``model`` with some layers replaced against ``model`` itself (interleaved medians)."""
    import copy
    import statistics
    import time

    x = speed_input(batch, opts.speed_batch).to(device_of(model))

    def ratio(replace: dict[str, nn.Module]) -> float:
        conv = copy.deepcopy(model)
        for name, new in replace.items():
            specmod.replace_module(conv, name, new)
        times: dict[str, list[float]] = {"dense": [], "conv": []}
        with torch.inference_mode(), eval_mode(model), eval_mode(conv):
            for m in (model, conv):
                m(x)
            for _ in range(9):
                for key, m in (("dense", model), ("conv", conv)):
                    t0 = time.perf_counter()
                    m(x)
                    times[key].append(time.perf_counter() - t0)
        return statistics.median(times["conv"]) / statistics.median(times["dense"])

    return ratio


class _Reached(Exception):
    """Stops a calibration forward once the layer being fitted has seen its inputs."""


def _inputs_after(model: nn.Module, batches: list[torch.Tensor], seen: Probe) -> Callable[[str, dict[str, nn.Module]], list[torch.Tensor]]:
    """``sequential=True``: a function returning the inputs of layer ``name`` on the calibration
    batches with the layers in ``replace`` swapped in (each forward stops at that layer)."""
    device = device_of(model)

    def inputs_after(name: str, replace: dict[str, nn.Module]) -> list[torch.Tensor]:
        per_batch = max(1, len(seen.inputs.get(name, [])) // max(1, len(batches)))  # calls per forward
        got: list[torch.Tensor] = []
        count = [0]

        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            x = first_tensor(args)
            if x is not None:
                got.append(x.detach().clone())
                count[0] += 1
            if count[0] >= per_batch:
                raise _Reached

        old = {n: specmod.replace_module(model, n, m) for n, m in replace.items()}
        handle = model.get_submodule(name).register_forward_pre_hook(hook)
        try:
            with torch.no_grad(), eval_mode(model):
                for x in batches:
                    count[0] = 0
                    try:
                        model(x.to(device))
                    except _Reached:
                        pass
        finally:
            handle.remove()
            for n, m in old.items():
                specmod.replace_module(model, n, m)
        return got

    return inputs_after


def _keep_only_faster(model: nn.Module, ctx: Context, batch: torch.Tensor) -> None:
    """Drop every planned replacement that does not time faster than its dense layer (``speed_check``)."""
    from lightning_struct.deploy.runtime import time_modules

    names = [n for n, _, _ in ctx.new_modules]
    shapes: dict[str, tuple[int, ...]] = {}

    def hook(name: str) -> Any:
        def record(_m: nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], torch.Tensor):
                shapes.setdefault(name, tuple(args[0].shape[1:]))

        return record

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad(), eval_mode(model):
            model(batch[:1].to(device_of(model)))
    finally:
        for h in handles:
            h.remove()
    rows = {r.name: r for r in ctx.rows}
    runtime, keep = ctx.options.speed_check, []
    for name, new, entry in ctx.new_modules:
        shape = shapes.get(name)
        if shape is None:  # the forward never reached it: nothing to time, nothing to decide
            keep.append((name, new, entry))
            continue
        dense = model.get_submodule(name)
        t = time_modules({"dense": dense, "new": new}, (ctx.options.speed_batch, *shape), runtime)  # type: ignore[arg-type]
        row = rows.get(name)
        if row is not None:
            row.detail = {**(row.detail or {}), "dense_ms": t["dense"] * 1e3, "converted_ms": t["new"] * 1e3}
        if t["new"] < t["dense"]:
            keep.append((name, new, entry))
        elif row is not None:
            row.status = f"kept dense: slower in {runtime} ({t['new'] * 1e3:.3f} ms vs {t['dense'] * 1e3:.3f} ms dense)"
            row.kind = "dense"
            row.params_after, row.flops_after = row.params_before, row.flops_before
    ctx.new_modules = keep


def _output_errors(ctx: Context) -> None:
    """Each converted layer's output error against the dense layer's recorded outputs: on the dense
    inputs, or (``sequential=True``) on the inputs it gets in the converted network."""
    new_by_name = {n: m for n, m, _ in ctx.new_modules}
    for row in ctx.rows:
        if row.status != "converted" or row.name not in ctx.probe.inputs or row.name not in new_by_name:
            continue
        new = new_by_name[row.name]
        inputs = ctx.fit_inputs.get(row.name, ctx.probe.inputs[row.name])
        with torch.no_grad(), eval_mode(new):
            ys = [new(x) for x in inputs]
        row.output_rel_error = rel_err(
            torch.cat([y.flatten() for y in ys]), torch.cat([y.flatten() for y in ctx.probe.outputs[row.name]])
        )


def fold_back(
    model: nn.Module, include: str | Sequence[str] | None = None, exclude: str | Sequence[str] | None = None
) -> ConversionReport:
    """Replace low-rank layers by the dense layers they compute (exact), in place.

    The folded layers are recorded in the spec as ``fold_*`` entries, so a checkpoint of the
    folded model still rebuilds (low-rank structure first, then the fold).
    """
    params_before = n_params(model)
    layers = select_layers(model, (LowRankConv2d, LowRankLinear), include, exclude, what="fold_back")
    rows, entries = [], []
    for name, m in layers:
        dense = m.to_dense()  # type: ignore[operator]
        specmod.replace_module(model, name, dense)
        kind = "fold_conv2d" if isinstance(m, LowRankConv2d) else "fold_linear"
        rows.append(
            LayerReport(
                name=name,
                kind=kind,
                status="converted",
                params_before=n_params(m),
                params_after=n_params(dense),
                weight_rel_error=0.0,
            )
        )
        entries.append({"name": name, "kind": kind})
    specmod.record(model, entries)
    return ConversionReport("fold", params_before, n_params(model), layers=rows, spec=entries)
