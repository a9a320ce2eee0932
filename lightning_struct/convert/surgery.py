"""Model surgery: replace selected layers by low-rank, ACDC or tied (row/column-space) modules.

:func:`convert` is the one entry point; :func:`fold_back` turns low-rank layers back into dense
ones. Both edit the model in place, record what they did in the model's conversion spec
(:mod:`lightning_struct.convert.spec`) and return a :class:`ConversionReport`.

How each method initialises the new layers:

* ``"lowrank"``: truncated SVD / HOSVD of the trained weight (:mod:`lightning_struct.ops.factorize`),
  data-free; the rank comes from one rule (``energy``, ``ratio``, ``rank`` or a global ``budget``).
* ``"acdc"``: layer-wise distillation - a fresh :class:`~lightning_struct.nn.acdc.ACDCStack`
  (identity-centred) is fitted with Adam to the dense layer's input/output pairs recorded on the
  calibration batches (``acdc_steps`` steps, mean squared error). Without calibration the inputs
  are standard normal samples (reported in the layer's ``detail``).
* ``"tied"``: :meth:`TiedBottleneck.from_bottleneck` / :meth:`TiedMLP.from_mlp` (least-squares
  initialisation of the shared ``W`` from the two dense 1x1 / linear weights); blocks whose
  shapes cannot be tied stay dense (or raise when named exactly in ``include``).

A layer whose factorized cost (parameters, or FLOPs with ``budget_on="flops"``) is not lower
than the dense cost always stays dense.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_struct.convert import spec as specmod
from lightning_struct.convert.report import ConversionReport, LayerReport
from lightning_struct.nn.lowrank import LowRankConv2d, LowRankLinear, pick_rank
from lightning_struct.ops import factorize as fz
from lightning_struct.select import resolve_types, select_layers

log = logging.getLogger(__name__)

Method = Literal["lowrank", "acdc", "tied"]
METHODS: tuple[str, ...] = ("lowrank", "acdc", "tied")

__all__ = ["METHODS", "convert", "fold_back", "calibration_inputs"]


# ----------------------------------------------------------------------------------------------
# optional modules of the ACDC / tied work (imported lazily so low-rank never depends on them)
# ----------------------------------------------------------------------------------------------
def _acdc_mod() -> Any:
    try:
        import lightning_struct.nn.acdc as acdc
    except ImportError as err:  # pragma: no cover - present in a full install
        raise ImportError(f"method='acdc' needs lightning_struct.nn.acdc: {err}") from err
    return acdc


def _tied_mod() -> Any:
    try:
        import lightning_struct.nn.tied as tied
    except ImportError as err:  # pragma: no cover
        raise ImportError(f"method='tied' needs lightning_struct.nn.tied: {err}") from err
    return tied


def _converted_types() -> tuple[type, ...]:
    """Module types produced by a conversion; layers inside them are never selected again."""
    types: list[type] = [LowRankConv2d, LowRankLinear]
    for modname, names in (
        ("lightning_struct.nn.acdc", ("ACDC", "ACDCStack", "ACDCConv1x1")),
        ("lightning_struct.nn.tied", ("TiedBottleneck", "TiedMLP")),
    ):
        try:
            mod = __import__(modname, fromlist=list(names))
        except ImportError:
            continue
        types += [getattr(mod, n) for n in names if isinstance(getattr(mod, n, None), type)]
    return tuple(types)


# ----------------------------------------------------------------------------------------------
# calibration
# ----------------------------------------------------------------------------------------------
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


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, f in flags.items():
            m.training = f


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@dataclass
class _Probe:
    """What the calibration forward saw."""

    in_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # per example (batch dim dropped)
    inputs: dict[str, list[Tensor]] = field(default_factory=dict)
    outputs: dict[str, list[Tensor]] = field(default_factory=dict)
    model_out: list[Tensor] = field(default_factory=list)


def _first_tensor(x: Any) -> Tensor | None:
    if isinstance(x, Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], Tensor):
        return x[0]
    return None


@torch.no_grad()
def _probe(
    model: nn.Module,
    batches: list[Tensor],
    shape_modules: Sequence[tuple[str, nn.Module]],
    keep_modules: Sequence[tuple[str, nn.Module]],
) -> _Probe:
    """Run ``batches`` (eval mode) recording input shapes and the selected layers' inputs/outputs."""
    probe = _Probe()
    keep = {id(m) for _, m in keep_modules}
    handles = []

    def make_hook(name: str, module: nn.Module) -> Any:
        def hook(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            x = _first_tensor(args)
            if x is None:
                return
            probe.in_shapes.setdefault(name, tuple(x.shape[1:]))
            if id(module) in keep:
                y = _first_tensor(out)
                # clones: later in-place ops (ReLU(inplace=True)) would overwrite the recorded tensors
                probe.inputs.setdefault(name, []).append(x.detach().clone())
                if y is not None:
                    probe.outputs.setdefault(name, []).append(y.detach().clone())

        return hook

    seen = set()
    for name, module in list(shape_modules) + list(keep_modules):
        if name in seen:
            continue
        seen.add(name)
        handles.append(module.register_forward_hook(make_hook(name, module)))
    device = _device(model)
    try:
        with _eval_mode(model):
            for x in batches:
                y = _first_tensor(model(x.to(device)))
                if y is not None:
                    probe.model_out.append(y.detach().clone())
    finally:
        for h in handles:
            h.remove()
    return probe


def _rel_err(a: Tensor, b: Tensor) -> float:
    """``||a - b|| / ||b||`` in float64 (0 when both are zero)."""
    a64, b64 = a.detach().double(), b.detach().double()
    den = float(b64.norm())
    num = float((a64 - b64).norm())
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


# ----------------------------------------------------------------------------------------------
# costs of one layer
# ----------------------------------------------------------------------------------------------
def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _rows(shape: tuple[int, ...] | None) -> int:
    """Positions per example of a linear layer input ``(*, in)`` (batch dim already dropped)."""
    if shape is None:
        return 1
    return int(math.prod(shape[:-1])) if len(shape) > 1 else 1


def _dense_flops(module: nn.Module, shape: tuple[int, ...] | None) -> int | None:
    if shape is None:
        return None
    if isinstance(module, nn.Conv2d):
        hw = fz.conv_out_hw(shape[-2:], module.kernel_size, module.stride, module.padding, module.dilation)  # type: ignore[arg-type]
        return fz.dense_conv_flops(module.weight.shape, hw)
    if isinstance(module, nn.Linear):
        return fz.dense_linear_flops(module.out_features, module.in_features, _rows(shape))
    return None


def _lowrank_cost(
    module: nn.Module, scheme: str, rank: int | tuple[int, int], shape: tuple[int, ...] | None, on: str
) -> int | None:
    bias = getattr(module, "bias", None) is not None
    if isinstance(module, nn.Conv2d):
        if on == "params":
            return fz.conv_factor_params(scheme, module.weight.shape, rank, module.groups, bias)
        if shape is None:
            return None
        return fz.conv_factor_flops(
            scheme,
            module.weight.shape,
            rank,
            shape[-2:],
            module.groups,
            module.stride,
            module.padding,
            module.dilation,  # type: ignore[arg-type]
        )
    assert isinstance(module, nn.Linear)
    if on == "params":
        return fz.linear_factor_params(module.out_features, module.in_features, int(rank), bias)  # type: ignore[arg-type]
    if shape is None:
        return None
    return fz.linear_factor_flops(module.out_features, module.in_features, int(rank), _rows(shape))  # type: ignore[arg-type]


def _dense_cost(module: nn.Module, shape: tuple[int, ...] | None, on: str) -> int | None:
    return _n_params(module) if on == "params" else _dense_flops(module, shape)


# ----------------------------------------------------------------------------------------------
# low-rank planning
# ----------------------------------------------------------------------------------------------
@dataclass
class _Plan:
    name: str
    module: nn.Module
    scheme: str  # conv scheme or "svd" for linear
    full: int | tuple[int, int]
    spectrum: Any = None
    rank: int | tuple[int, int] | None = None
    reason: str = ""


def _spectrum(module: nn.Module, scheme: str) -> Any:
    w = module.weight.detach()  # type: ignore[union-attr]
    if isinstance(module, nn.Conv2d):
        return fz.conv_spectrum(w, scheme, module.groups)
    return fz.singular_values(w).unsqueeze(0)


def _full_rank(module: nn.Module, scheme: str) -> int | tuple[int, int]:
    if isinstance(module, nn.Conv2d):
        return fz.conv_full_rank(module.weight.shape, scheme, module.groups)
    return min(module.weight.shape)  # type: ignore[union-attr]


def _tucker_path(
    full: tuple[int, int], spectrum: tuple[Tensor, Tensor]
) -> tuple[list[tuple[int, int]], Tensor]:
    """Rank pairs along a proportional path and a lower bound of their retained energy (HOSVD)."""
    m = max(full)
    j = torch.arange(1, m + 1, dtype=torch.float64)
    ri = torch.ceil(j * full[0] / m).long().clamp(1, full[0])
    ro = torch.ceil(j * full[1] / m).long().clamp(1, full[1])
    e_in = fz.retained_energy(spectrum[0])
    e_out = fz.retained_energy(spectrum[1])
    value = (e_in[ri - 1] + e_out[ro - 1] - 1.0).clamp_min(1e-12)
    return list(zip(ri.tolist(), ro.tolist())), value


def _plan_budget(
    plans: list[_Plan], budget: float, on: str, shapes: dict[str, tuple[int, ...]]
) -> tuple[float, float]:
    """Fill ``plan.rank`` for every layer by greedy allocation; returns (dense total, budget used)."""
    costs, values, options, owners = [], [], [], []
    fixed = 0.0
    dense_total = 0.0
    for i, p in enumerate(plans):
        shape = shapes.get(p.name)
        dense = _dense_cost(p.module, shape, on)
        if dense is None:
            raise ValueError(
                f"budget_on='flops' needs the input shape of layer {p.name!r}: pass `calibration` or "
                f"`input_size` (the layer was not reached by the forward pass)"
            )
        dense_total += dense
        if p.scheme == "tucker2":
            ranks, value = _tucker_path(p.full, p.spectrum)  # type: ignore[arg-type]
        else:
            ranks = list(range(1, int(p.full) + 1))  # type: ignore[arg-type]
            value = fz.retained_energy(p.spectrum)
        cost = torch.tensor(
            [float(_lowrank_cost(p.module, p.scheme, r, shape, on)) for r in ranks],  # type: ignore[arg-type]
            dtype=torch.float64,
        )
        cheaper = cost < dense
        n_ok = int(cheaper.long().cumprod(0).sum())
        if n_ok == 0:
            p.reason = "kept dense: factorized cost not lower"
            fixed += dense
            continue
        costs.append(cost[:n_ok])
        values.append(value[:n_ok])
        options.append(ranks[:n_ok])
        owners.append(i)
    target = budget * dense_total if budget <= 1.0 else float(budget)
    choice = fz.allocate_budget(costs, values, target, fixed_cost=fixed)
    for k, (idx, t) in enumerate(zip(owners, choice)):
        plans[idx].rank = options[k][t]
    return dense_total, target


# ----------------------------------------------------------------------------------------------
# builders (also used to rebuild a saved spec)
# ----------------------------------------------------------------------------------------------
def _build_lowrank_conv(old: nn.Module, entry: dict[str, Any], root: nn.Module | None = None) -> nn.Module:
    if not isinstance(old, nn.Conv2d):
        raise ValueError(
            f"spec entry {entry['name']!r} (lowrank_conv2d) expects an nn.Conv2d, found {type(old).__name__}"
        )
    w = old.weight
    return LowRankConv2d.from_spec(entry).to(device=w.device, dtype=w.dtype)


def _build_lowrank_linear(old: nn.Module, entry: dict[str, Any], root: nn.Module | None = None) -> nn.Module:
    if not isinstance(old, nn.Linear):
        raise ValueError(
            f"spec entry {entry['name']!r} (lowrank_linear) expects an nn.Linear, found {type(old).__name__}"
        )
    w = old.weight
    return LowRankLinear.from_spec(entry).to(device=w.device, dtype=w.dtype)


def _build_dense_conv(old: nn.Module, entry: dict[str, Any], root: nn.Module | None = None) -> nn.Module:
    """A folded-back low-rank conv: rebuild the dense conv from the low-rank module's geometry."""
    if isinstance(old, LowRankConv2d):
        return old.to_dense()
    raise ValueError(
        f"spec entry {entry['name']!r} (fold) expects a LowRank layer, found {type(old).__name__}"
    )


def _build_dense_linear(old: nn.Module, entry: dict[str, Any], root: nn.Module | None = None) -> nn.Module:
    if isinstance(old, LowRankLinear):
        return old.to_dense()
    raise ValueError(
        f"spec entry {entry['name']!r} (fold) expects a LowRankLinear, found {type(old).__name__}"
    )


def _acdc_kwargs(entry: dict[str, Any]) -> dict[str, Any]:
    keys = ("n_factors", "relu", "permute", "sigma", "bias", "seed")
    return {k: entry[k] for k in keys if k in entry}


def _build_acdc_linear(old: nn.Module, entry: dict[str, Any], root: nn.Module | None = None) -> nn.Module:
    acdc = _acdc_mod()
    w = old.weight  # type: ignore[union-attr]
    return acdc.ACDCStack(entry["in_features"], entry["out_features"], **_acdc_kwargs(entry)).to(
        device=w.device, dtype=w.dtype
    )


def _build_acdc_conv(old: nn.Module, entry: dict[str, Any], root: nn.Module | None = None) -> nn.Module:
    acdc = _acdc_mod()
    w = old.weight  # type: ignore[union-attr]
    return acdc.ACDCConv1x1(
        entry["in_channels"], entry["out_channels"], stride=int(entry.get("stride", 1)), **_acdc_kwargs(entry)
    ).to(device=w.device, dtype=w.dtype)


def _build_tied_bottleneck(old: nn.Module, entry: dict[str, Any], root: nn.Module | None = None) -> nn.Module:
    new = _tied_mod().TiedBottleneck.from_bottleneck(old)
    share = entry.get("share_with")
    if share:
        if root is None:
            raise ValueError(
                f"spec entry {entry['name']!r} shares W with {share!r} but no root model was given"
            )
        new.share_weight(specmod.get_submodule(root, share).weight)
    return new


def _build_tied_mlp(old: nn.Module, entry: dict[str, Any], root: nn.Module | None = None) -> nn.Module:
    return _tied_mod().TiedMLP.from_mlp(old)


for _kind, _fn in (
    ("lowrank_conv2d", _build_lowrank_conv),
    ("lowrank_linear", _build_lowrank_linear),
    ("fold_conv2d", _build_dense_conv),
    ("fold_linear", _build_dense_linear),
    ("acdc_linear", _build_acdc_linear),
    ("acdc_conv1x1", _build_acdc_conv),
    ("tied_bottleneck", _build_tied_bottleneck),
    ("tied_mlp", _build_tied_mlp),
):
    specmod.register_builder(_kind, _fn)


# ----------------------------------------------------------------------------------------------
# the entry point
# ----------------------------------------------------------------------------------------------
def _check_rules(method: str, energy: Any, ratio: Any, rank: Any, budget: Any, budget_on: str) -> None:
    if method not in METHODS:
        raise ValueError(f"convert: method={method!r}; allowed: {list(METHODS)}")
    given = [
        n
        for n, v in (("energy", energy), ("ratio", ratio), ("rank", rank), ("budget", budget))
        if v is not None
    ]
    if method == "lowrank":
        if len(given) != 1:
            raise ValueError(
                f"convert(method='lowrank') needs exactly one rank rule among energy, ratio, rank, budget; got {given or 'none'}"
            )
        if budget is not None and not (isinstance(budget, (int, float)) and budget > 0):
            raise ValueError(
                f"convert: budget={budget!r} must be > 0 (a fraction <= 1 of the dense cost, or an absolute count)"
            )
        if budget_on not in ("params", "flops"):
            raise ValueError(f"convert: budget_on={budget_on!r}; allowed: 'params', 'flops'")
    elif given:
        raise ValueError(f"convert(method={method!r}) takes no rank rule; got {given}")


def _default_types(method: str) -> tuple[type, ...]:
    if method == "lowrank":
        return (nn.Conv2d, nn.Linear)
    if method == "acdc":
        return (nn.Linear, nn.Conv2d)
    from torchvision.models.resnet import Bottleneck
    from torchvision.models.vision_transformer import MLPBlock

    return (Bottleneck, MLPBlock)


def _exact_names(include: str | Sequence[str] | None) -> set[str]:
    if include is None:
        return set()
    pats = [include] if isinstance(include, str) else list(include)
    return {p for p in pats if not set("*?[") & set(p)}


def convert(
    model: nn.Module,
    method: str,
    *,
    energy: float | None = None,
    ratio: float | None = None,
    rank: int | Sequence[int] | None = None,
    budget: float | None = None,
    budget_on: str = "params",
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    types: Sequence[type | str] | None = None,
    scheme: str = "channel",
    rank_multiple: int = 1,
    calibration: Any = None,
    calibration_batches: int | None = 8,
    input_size: Sequence[int] | None = None,
    acdc_factors: int = 12,
    acdc_relu: bool = True,
    acdc_permute: bool = True,
    acdc_sigma: float = 0.01,
    acdc_steps: int = 300,
    acdc_lr: float = 1e-2,
    tied_staged: bool = False,
    seed: int = 0,
) -> ConversionReport:
    """Replace selected layers of ``model`` in place and report what changed.

    Args:
        model: any ``nn.Module`` (a LightningModule works; names are relative to it).
        method: ``"lowrank"``, ``"acdc"`` or ``"tied"``.
        energy: low-rank: keep this fraction of the squared singular values (e.g. ``0.95``).
        ratio: low-rank: keep this fraction of each layer's full rank.
        rank: low-rank: absolute rank per layer (a pair ``(R_in, R_out)`` allowed for tucker2).
        budget: low-rank: global budget over the selected layers, a fraction ``<= 1`` of their
            dense cost or an absolute count ``> 1``; ranks are allocated greedily.
        budget_on: ``"params"`` or ``"flops"`` (multiply-accumulates; needs input shapes).
        include: name globs of layers to convert (default: every layer of ``types``).
        exclude: name globs to leave alone.
        types: layer classes (or names) to consider; defaults: lowrank ``Conv2d, Linear``;
            acdc ``Linear`` and ``1x1 Conv2d``; tied torchvision ``Bottleneck`` and ViT ``MLPBlock``.
        scheme: conv scheme for low-rank: ``"channel"``, ``"spatial"`` or ``"tucker2"``
            (linear layers always use the SVD).
        rank_multiple: low-rank with energy/ratio/rank: round each rank up to a multiple of this
            (e.g. 8: channel counts that vectorised conv kernels handle well); the rounded rank
            keeps at least the requested energy and is still checked for being cheaper.
        calibration: a batch, a Tensor, or an iterable of batches (``DataLoader``): gives input
            shapes (FLOPs), output errors and the ACDC fitting data. Run in eval mode, no grad.
        calibration_batches: at most this many batches are taken from an iterable.
        input_size: per-example input shape (e.g. ``(3, 224, 224)``) used for FLOPs when no
            calibration is given.
        acdc_factors, acdc_relu, acdc_permute, acdc_sigma: ACDC stack hyper-parameters.
        acdc_steps, acdc_lr: Adam steps / learning rate of the layer-wise ACDC fit.
        tied_staged: tied: one shared ``W`` per stage (the tieable blocks under one parent
            module, e.g. ``layer3``) instead of one per block (Koyun & Toreyin's staged sharing).
        seed: seed of the ACDC permutations and of the fit's mini-batch sampling.

    Returns:
        A :class:`ConversionReport` (``params_before``/``params_after`` of the whole model,
        per-layer rows). The replacements are appended to the model's conversion spec.

    Raises:
        ValueError: bad method/rule/arguments, an include pattern matching nothing, or an
            exactly named layer that cannot be converted (e.g. a 3x3 conv for ACDC, a
            downsampling bottleneck for tied).
    """
    _check_rules(method, energy, ratio, rank, budget, budget_on)
    if method == "lowrank":
        fz.check_scheme(scheme)
    if isinstance(rank_multiple, bool) or not isinstance(rank_multiple, int) or rank_multiple < 1:
        raise ValueError(f"convert: rank_multiple={rank_multiple!r} must be an int >= 1")
    if rank_multiple > 1 and (method != "lowrank" or budget is not None):
        raise ValueError(
            "convert: rank_multiple applies to method='lowrank' with energy, ratio or rank (not budget)"
        )
    layer_types = resolve_types(types, _default_types(method))
    converted_types = _converted_types()
    candidates = select_layers(model, layer_types, include, exclude, what=f"convert(method={method!r})")
    inside = [n for n, m in model.named_modules() if n and isinstance(m, converted_types)]
    candidates = [
        (n, m)
        for n, m in candidates
        if not isinstance(m, converted_types) and not any(n.startswith(c + ".") for c in inside)
    ]
    exact = _exact_names(include)

    # ---- calibration forward: shapes (FLOPs), dense layer inputs/outputs, model output
    batches = calibration_inputs(calibration, calibration_batches)
    if not batches and input_size is not None:
        batches = [torch.zeros(1, *[int(s) for s in input_size], device=_device(model))]
        keep_io = False
    else:
        keep_io = bool(batches)
    shape_modules = [
        (n, m)
        for n, m in model.named_modules()
        if n and isinstance(m, (nn.Conv2d, nn.Linear)) and not isinstance(m, converted_types)
    ]
    probe = _probe(model, batches, shape_modules, candidates if keep_io else []) if batches else _Probe()
    params_before = _n_params(model)
    flops_all = [_dense_flops(m, probe.in_shapes.get(n)) for n, m in shape_modules]
    flops_before = int(sum(f for f in flops_all if f is not None)) if batches else None

    rows: list[LayerReport] = []
    new_modules: list[tuple[str, nn.Module, dict[str, Any]]] = []

    if method == "lowrank":
        _convert_lowrank(
            candidates,
            probe,
            rows,
            new_modules,
            energy,
            ratio,
            rank,
            budget,
            budget_on,
            scheme,
            rank_multiple,
        )
    elif method == "acdc":
        _convert_acdc(
            candidates, exact, probe, rows, new_modules, acdc_factors, acdc_relu, acdc_permute, acdc_sigma,
            acdc_steps, acdc_lr, seed, keep_io,
        )  # fmt: skip
    else:
        _convert_tied(candidates, exact, probe, rows, new_modules, tied_staged)

    # ---- errors on the calibration inputs, before swapping (the dense layers are still in place)
    for row in rows:
        if row.status != "converted" or not keep_io or row.name not in probe.inputs:
            continue
        new = next(m for n, m, _ in new_modules if n == row.name)
        with torch.no_grad(), _eval_mode(new):
            ys = [new(x) for x in probe.inputs[row.name]]
        row.output_rel_error = _rel_err(
            torch.cat([y.flatten() for y in ys]), torch.cat([y.flatten() for y in probe.outputs[row.name]])
        )

    # ---- swap
    entries = []
    for name, new, entry in new_modules:
        old = specmod.replace_module(model, name, new)
        new.train(old.training)
        entries.append(dict(entry, name=name))
    specmod.record(model, entries)

    report = ConversionReport(
        method=method,
        params_before=params_before,
        params_after=_n_params(model),
        layers=rows,
        spec=entries,
    )
    if flops_before is not None:
        delta = sum((r.flops_after or 0) - (r.flops_before or 0) for r in rows if r.status == "converted")
        report.flops_before = flops_before
        report.flops_after = flops_before + delta
    if keep_io and probe.model_out:
        device = _device(model)
        with torch.no_grad(), _eval_mode(model):
            outs = [_first_tensor(model(x.to(device))) for x in batches]
        report.output_rel_error = _rel_err(
            torch.cat([o.flatten() for o in outs if o is not None]),
            torch.cat([o.flatten() for o in probe.model_out]),
        )
    log.debug("%s", report)
    return report


def _round_up(
    rank: int | tuple[int, int], full: int | tuple[int, int], multiple: int
) -> int | tuple[int, int]:
    """Round a rank up to a multiple (hardware-friendly channel counts), capped at the full rank."""
    if isinstance(rank, tuple):
        assert isinstance(full, tuple)
        return (
            min(full[0], -(-rank[0] // multiple) * multiple),
            min(full[1], -(-rank[1] // multiple) * multiple),
        )
    return min(int(full), -(-int(rank) // multiple) * multiple)  # type: ignore[arg-type]


def _convert_lowrank(
    candidates: list[tuple[str, nn.Module]],
    probe: _Probe,
    rows: list[LayerReport],
    new_modules: list[tuple[str, nn.Module, dict[str, Any]]],
    energy: float | None,
    ratio: float | None,
    rank: Any,
    budget: float | None,
    budget_on: str,
    scheme: str,
    rank_multiple: int = 1,
) -> None:
    plans = []
    for name, m in candidates:
        sch = scheme if isinstance(m, nn.Conv2d) else "svd"
        plans.append(_Plan(name, m, sch, _full_rank(m, sch)))
    need_spectrum = energy is not None or budget is not None
    for p in plans:
        if need_spectrum:
            p.spectrum = _spectrum(p.module, p.scheme)
    cost_on = budget_on if budget is not None else "params"
    if budget is not None:
        _plan_budget(plans, budget, budget_on, probe.in_shapes)
    else:
        for p in plans:
            r = rank
            if isinstance(p.module, nn.Linear) and isinstance(rank, (tuple, list)):
                r = int(min(rank))
            p.rank = pick_rank(p.spectrum, p.full, rank=r, energy=energy, ratio=ratio)  # type: ignore[arg-type]
            if p.scheme != "tucker2" and isinstance(p.rank, tuple):
                p.rank = int(min(p.rank))
            if rank_multiple > 1:
                p.rank = _round_up(p.rank, p.full, rank_multiple)
    for p in plans:
        m = p.module
        shape = probe.in_shapes.get(p.name)
        row = LayerReport(
            name=p.name,
            kind="dense",
            status=p.reason or "converted",
            params_before=_n_params(m),
            params_after=_n_params(m),
            flops_before=_dense_flops(m, shape),
            flops_after=_dense_flops(m, shape),
        )
        rows.append(row)
        if p.reason:
            continue
        assert p.rank is not None
        dense_cost = _dense_cost(m, shape, cost_on)
        fact_cost = _lowrank_cost(m, p.scheme, p.rank, shape, cost_on)
        if dense_cost is not None and fact_cost is not None and fact_cost >= dense_cost:
            row.status = "kept dense: factorized cost not lower"
            row.detail = {"rank": p.rank}
            continue
        if isinstance(m, nn.Conv2d):
            new: nn.Module = LowRankConv2d.from_dense(m, rank=p.rank, scheme=p.scheme)
        else:
            new = LowRankLinear.from_dense(m, rank=int(p.rank))  # type: ignore[arg-type]
        spec = new.spec()  # type: ignore[operator]
        row.kind = spec["kind"]
        row.status = "converted"
        row.detail = {"scheme": p.scheme, "rank": p.rank}
        row.params_after = _n_params(new)
        fl = _lowrank_cost(m, p.scheme, p.rank, shape, "flops")
        row.flops_after = fl
        with torch.no_grad():
            row.weight_rel_error = _rel_err(new.dense_weight(), m.weight)  # type: ignore[operator]
        new_modules.append((p.name, new, spec))


def _acdc_flops(n_factors: int, size: int, rows: int) -> int:
    """Approximate MACs of an ACDC stack: per factor two diagonals and two N log2 N transforms."""
    return int(n_factors * rows * (2 * size + 2 * size * max(1, math.ceil(math.log2(max(size, 2))))))


def _fit_acdc(
    new: nn.Module, old: nn.Module, xs: list[Tensor], steps: int, lr: float, seed: int
) -> tuple[float, float]:
    """Layer-wise distillation: Adam on ``mean ||new(x) - old(x)||^2``; returns (first, last) loss."""
    x_all = torch.cat(xs)
    with torch.no_grad():
        y_all = old(x_all)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    opt = torch.optim.Adam(new.parameters(), lr=lr)
    n = x_all.shape[0]
    bs = min(n, 256)
    first = last = float("nan")
    scale = float(y_all.double().pow(2).mean().clamp_min(1e-30))
    flags = {m: m.training for m in new.modules()}
    new.train()
    try:
        with torch.enable_grad():
            for step in range(max(0, steps)):
                idx = torch.randint(0, n, (bs,), generator=gen).to(x_all.device)
                loss = (new(x_all[idx]) - y_all[idx]).pow(2).mean() / scale
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                last = float(loss.detach())
                if step == 0:
                    first = last
    finally:
        for m, f in flags.items():
            m.training = f
    return first, last


def _convert_acdc(
    candidates: list[tuple[str, nn.Module]],
    exact: set[str],
    probe: _Probe,
    rows: list[LayerReport],
    new_modules: list[tuple[str, nn.Module, dict[str, Any]]],
    n_factors: int,
    relu: bool,
    permute: bool,
    sigma: float,
    steps: int,
    lr: float,
    seed: int,
    have_data: bool,
) -> None:
    acdc = _acdc_mod()
    hp = {"n_factors": n_factors, "relu": relu, "permute": permute, "sigma": sigma, "seed": seed}
    for name, m in candidates:
        shape = probe.in_shapes.get(name)
        row = LayerReport(
            name=name, kind="dense", status="converted", params_before=_n_params(m), params_after=_n_params(m),
            flops_before=_dense_flops(m, shape), flops_after=_dense_flops(m, shape),
        )  # fmt: skip
        rows.append(row)
        bias = getattr(m, "bias", None) is not None
        if isinstance(m, nn.Conv2d):
            st = m.stride
            ok = m.kernel_size == (1, 1) and m.groups == 1 and st[0] == st[1]
            ok = ok and (m.padding == (0, 0) or m.padding == "valid") and m.padding_mode == "zeros"
            if not ok:
                msg = (
                    f"convert(method='acdc'): layer {name!r} is a {m.kernel_size} conv (stride {st}, groups "
                    f"{m.groups}, padding {m.padding}); ACDC replaces only 1x1, ungrouped, unpadded convs (equal "
                    f"strides) and Linear layers"
                )
                if name in exact:
                    raise ValueError(msg)
                row.status = "kept dense: not a plain 1x1 conv"
                continue
            entry = {
                "kind": "acdc_conv1x1",
                "in_channels": m.in_channels,
                "out_channels": m.out_channels,
                "stride": st[0],
                "bias": bias,
                **hp,
            }
            new: nn.Module = acdc.ACDCConv1x1(m.in_channels, m.out_channels, stride=st[0], bias=bias, **hp)
            size = max(m.in_channels, m.out_channels)
            rows_per_example = (
                int(math.prod(fz.conv_out_hw(shape[-2:], (1, 1), st))) if shape is not None else 1  # type: ignore[arg-type]
            )
        else:
            entry = {
                "kind": "acdc_linear",
                "in_features": m.in_features,
                "out_features": m.out_features,
                "bias": bias,
                **hp,
            }
            new = acdc.ACDCStack(m.in_features, m.out_features, bias=bias, **hp)
            size = max(m.in_features, m.out_features)
            rows_per_example = _rows(shape)
        w = m.weight
        new = new.to(device=w.device, dtype=w.dtype)
        if _n_params(new) >= _n_params(m):
            row.status = "kept dense: factorized cost not lower"
            continue
        if have_data and name in probe.inputs:
            xs = probe.inputs[name]
            source = "calibration"
        else:
            in_dim = m.in_channels if isinstance(m, nn.Conv2d) else m.in_features
            gen = torch.Generator(device="cpu").manual_seed(seed)
            x = torch.randn(512, in_dim, generator=gen, dtype=w.dtype)
            if isinstance(m, nn.Conv2d):
                x = x[:, :, None, None]
            xs = [x.to(w.device)]
            source = "synthetic N(0,1)"
        first, last = _fit_acdc(new, m, xs, steps, lr, seed)
        row.kind = entry["kind"]
        row.detail = {"n_factors": n_factors, "fit": source, "fit_loss": f"{first:.3g}->{last:.3g}"}
        row.params_after = _n_params(new)
        if shape is not None:
            row.flops_after = _acdc_flops(n_factors, size, rows_per_example)
        new_modules.append((name, new, entry))


def _convert_tied(
    candidates: list[tuple[str, nn.Module]],
    exact: set[str],
    probe: _Probe,
    rows: list[LayerReport],
    new_modules: list[tuple[str, nn.Module, dict[str, Any]]],
    staged: bool,
) -> None:
    tied = _tied_mod()
    from torchvision.models.resnet import Bottleneck
    from torchvision.models.vision_transformer import MLPBlock

    stages: dict[str, list[tuple[str, nn.Module, LayerReport]]] = {}
    for name, m in candidates:
        row = LayerReport(
            name=name, kind="dense", status="converted", params_before=_n_params(m), params_after=_n_params(m)
        )
        rows.append(row)
        try:
            if isinstance(m, Bottleneck):
                tied.check_tieable_bottleneck(m)
                if staged:
                    stages.setdefault(name.rpartition(".")[0], []).append((name, m, row))
                    continue
                new, kind = tied.TiedBottleneck.from_bottleneck(m), "tied_bottleneck"
            elif isinstance(m, MLPBlock):
                new, kind = tied.TiedMLP.from_mlp(m), "tied_mlp"
            else:
                raise ValueError(f"{type(m).__name__} is neither a torchvision Bottleneck nor a ViT MLPBlock")
        except ValueError as err:
            if name in exact:
                raise ValueError(f"convert(method='tied'): layer {name!r} cannot be tied: {err}") from err
            row.status = f"kept dense: {err}"
            continue
        row.kind = kind
        row.params_after = _n_params(new)
        new_modules.append((name, new, {"kind": kind}))
    # staged sharing: one least-squares W per stage (the blocks of one parent container)
    for members in stages.values():
        news = tied.TiedBottleneck.from_bottlenecks([m for _, m, _ in members])
        first = members[0][0]
        for i, ((name, _, row), new) in enumerate(zip(members, news)):
            row.kind = "tied_bottleneck"
            row.detail = {"shared_W_with": first} if i else {"shared_W": f"{len(members)} blocks"}
            # the shared W is counted once, in the first block of the stage
            row.params_after = _n_params(new) - (new.weight.numel() if i else 0)
            entry: dict[str, Any] = {"kind": "tied_bottleneck"}
            if i:
                entry["share_with"] = first
            new_modules.append((name, new, entry))


def fold_back(
    model: nn.Module, include: str | Sequence[str] | None = None, exclude: str | Sequence[str] | None = None
) -> ConversionReport:
    """Replace low-rank layers by the dense layers they compute (exact), in place.

    The folded layers are recorded in the spec as ``fold_*`` entries, so a checkpoint of the
    folded model still rebuilds (low-rank structure first, then the fold).
    """
    params_before = _n_params(model)
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
                params_before=_n_params(m),
                params_after=_n_params(dense),
                weight_rel_error=0.0,
            )
        )
        entries.append({"name": name, "kind": kind})
    specmod.record(model, entries)
    return ConversionReport("fold", params_before, _n_params(model), layers=rows, spec=entries)
