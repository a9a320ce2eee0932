"""Low-rank conversion: truncated SVD / HOSVD of each trained weight, one rank rule per call."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_struct.nn.lowrank import LowRankConv2d, LowRankLinear, pick_rank
from lightning_struct.ops import factorize as fz
from lightning_struct.ops import whiten as wh
from lightning_struct.surgery._context import Context
from lightning_struct.surgery.costs import dense_cost, lowrank_cost
from lightning_struct.surgery.probe import rel_err

__all__ = ["convert_lowrank"]


@dataclass
class _Plan:
    name: str
    module: nn.Module
    scheme: str  # conv scheme or "svd" for linear
    full: int | tuple[int, int]
    spectrum: Any = None
    rank: int | tuple[int, int] | None = None
    reason: str = ""
    whitening: Tensor | None = None  # objective="output": S with S S^T = the input covariance
    latency: tuple[float, float] | None = None  # budget_on="latency": (dense, factorized) seconds


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


def _rank_grid(full: int, points: int = 12) -> list[int]:
    """The candidate ranks whose latency is measured: ``points`` spread evenly over ``1..full``,
    plus the powers of two below ``full / points`` (so that a tight budget can reach small ranks)."""
    even = {max(1, -(-full * k // points)) for k in range(1, points + 1)}
    small = {1 << i for i in range(full.bit_length()) if (1 << i) < full / points}
    return sorted(even | small)


def _plan_latency(plans: list[_Plan], ctx: Context) -> None:
    """``budget_on="latency"``: measured per-layer latencies of candidate ranks, greedy allocation."""
    from lightning_struct.deploy.runtime import time_modules

    o = ctx.options
    assert o.budget is not None and ctx.latency_ratio is not None
    costs, values, options, owners = [], [], [], []
    for i, p in enumerate(plans):
        if p.scheme == "tucker2":
            raise ValueError("convert: budget_on='latency' supports the channel and spatial schemes and Linear layers")
        shape = ctx.probe.in_shapes.get(p.name)
        if shape is None:
            raise ValueError(f"convert: budget_on='latency' needs the input shape of layer {p.name!r} (not reached by the forward)")
        full_shape = (o.speed_batch, *shape)
        dense = time_modules({"dense": p.module}, full_shape)["dense"]
        ranks = _rank_grid(int(p.full))  # type: ignore[arg-type]
        build = (
            (lambda r, m=p.module, sch=p.scheme: LowRankConv2d.from_dense(m, rank=r, scheme=sch))
            if isinstance(p.module, nn.Conv2d)
            else (lambda r, m=p.module: LowRankLinear.from_dense(m, rank=r))
        )
        timed = time_modules({str(r): build(r) for r in ranks}, full_shape)
        keep = [r for r in ranks if timed[str(r)] < dense]
        if not keep:
            p.reason = f"kept dense: no rank times faster than dense ({dense * 1e3:.3f} ms)"
            continue
        energy = fz.retained_energy(p.spectrum).reshape(-1)
        c = torch.tensor([timed[str(r)] for r in keep], dtype=torch.float64)
        c = torch.cummax(c, 0).values  # non-decreasing, as the allocation needs
        costs.append(c)
        values.append(torch.stack([energy[r - 1] for r in keep]).to(torch.float64).clamp_min(1e-12))
        options.append(keep)
        owners.append((i, dense))
    if not costs:
        return

    def ranks_at(alpha: float) -> list[int]:
        lo = sum(float(c[0]) for c in costs)
        hi = sum(float(c[-1]) for c in costs)
        choice = fz.allocate_budget(costs, values, lo + alpha * (hi - lo) + 1e-12)
        return [options[k][t] for k, t in enumerate(choice)]

    def measure(ranks: list[int]) -> float:
        built = {}
        for (idx, _), r in zip(owners, ranks):
            p = plans[idx]
            built[p.name] = (
                LowRankConv2d.from_dense(p.module, rank=r, scheme=p.scheme)
                if isinstance(p.module, nn.Conv2d)
                else LowRankLinear.from_dense(p.module, rank=r)
            )
        return float(ctx.latency_ratio(built))

    # the sum of isolated layer times does not predict the network's time (fixed costs, caches):
    # bisect the allocation's total on the measured ratio of the whole network instead
    best = ranks_at(0.0)
    best_ratio = measure(best)
    if best_ratio <= o.budget:
        full = ranks_at(1.0)
        full_ratio = measure(full)
        if full_ratio <= o.budget:
            best, best_ratio = full, full_ratio
        else:
            lo, hi = 0.0, 1.0
            for _ in range(5):
                mid = (lo + hi) / 2
                ranks = ranks_at(mid)
                r = measure(ranks)
                if r <= o.budget:
                    lo, best, best_ratio = mid, ranks, r
                else:
                    hi = mid
    ctx.measured_ratio = best_ratio
    for k, ((idx, dense), rank) in enumerate(zip(owners, best)):
        plans[idx].rank = rank
        plans[idx].latency = (dense, float(costs[k][options[k].index(rank)]))


def _plan_budget(
    plans: list[_Plan], budget: float, on: str, shapes: dict[str, tuple[int, ...]]
) -> tuple[float, float]:
    """Fill ``plan.rank`` for every layer by greedy allocation; returns (dense total, budget used)."""
    costs, values, options, owners = [], [], [], []
    fixed = 0.0
    dense_total = 0.0
    for i, p in enumerate(plans):
        shape = shapes.get(p.name)
        dense = dense_cost(p.module, shape, on)
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
            [float(lowrank_cost(p.module, p.scheme, r, shape, on)) for r in ranks],  # type: ignore[arg-type]
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


def _layer_columns(module: nn.Module, inputs: list[Tensor]) -> tuple[Iterator[Tensor], int]:
    """The vectors the layer's weight multiplies, as column blocks (Linear: the inputs; conv: the
    unfolded patches), generated a few at a time, and their dimension."""
    import torch.nn.functional as F

    if isinstance(module, nn.Linear):
        return (c for x in inputs for c in wh.row_columns(x, module.in_features)), module.in_features
    conv: Any = module
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode

    def blocks() -> Iterator[Tensor]:
        for x in inputs:
            x = x if x.dim() == 4 else x.unsqueeze(0)
            x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
            yield from wh.patch_columns(x, conv.kernel_size, conv.stride, (0, 0), conv.dilation)

    return blocks(), conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]


def _whiten(ctx: Context, p: _Plan) -> None:
    """``objective="output"``: the layer's whitening and its output-error spectrum (float64)."""
    m = p.module
    if isinstance(m, nn.Conv2d) and m.groups != 1:
        raise ValueError(
            f"convert: objective='output' supports groups=1 convs; layer {p.name!r} has groups={m.groups} "
            "(exclude it, or use objective='weight')"
        )
    inputs = ctx.probe.inputs.get(p.name)
    if not inputs:
        raise ValueError(f"convert: objective='output' needs the calibration inputs of layer {p.name!r}; the forward did not reach it")
    cols, dim = _layer_columns(m, inputs)
    cov, n = wh.gram(cols)
    if n < dim:
        need = -(-dim * len(inputs) // max(n, 1))  # batches like these
        raise ValueError(
            f"convert: objective='output' needs at least {dim} calibration rows for layer {p.name!r} "
            f"(its input dimension{' C*kh*kw' if isinstance(m, nn.Conv2d) else ''} is {dim}); the calibration "
            f"gave {n} in {len(inputs)} batch(es): pass at least {need} batches like these "
            f"(calibration_batches={need}, or a larger calibration)"
        )
    p.whitening = wh.whitening(cov / n)
    w2d = m.weight.detach().reshape(m.weight.shape[0], -1)  # type: ignore[union-attr]
    p.spectrum = wh.whitened_spectrum(w2d, p.whitening).to(torch.float32).unsqueeze(0)


def _set_factors(new: nn.Module, dense: nn.Module, s: Tensor, rank: int, cross: Tensor | None = None) -> None:
    """Overwrite the factors of ``new`` with the output-optimal ones for the whitening ``s``
    (and, for sequential fitting, the cross-covariance ``cross``): channel scheme / Linear."""
    w = dense.weight.detach()  # type: ignore[union-attr]
    first, second = wh.output_aware_factors(
        w.reshape(w.shape[0], -1), s.to(w.device), rank, cross=None if cross is None else cross.to(w.device)
    )
    with torch.no_grad():
        new.first.weight.copy_(first.reshape(new.first.weight.shape))  # type: ignore[union-attr]
        new.second.weight.copy_(second.reshape(new.second.weight.shape))  # type: ignore[union-attr]


def _fit_sequentially(ctx: Context, plans: dict[str, _Plan]) -> None:
    """``sequential=True``: fit each new layer, in forward order, on the inputs it receives with
    the layers before it already converted (reduced-rank regression of its dense outputs). The
    first layer reached sees the dense inputs: its fit is the plain output-optimal one."""
    order = {name: k for k, name in enumerate(ctx.probe.inputs)}  # the order the forward reached them
    done: dict[str, nn.Module] = {}
    for name, new, _ in sorted(ctx.new_modules, key=lambda t: order.get(t[0], len(order))):
        p, dense = plans[name], ctx.module(name)
        if not done:
            assert p.whitening is not None
            _set_factors(new, dense, p.whitening, int(p.rank))  # type: ignore[arg-type]
            done[name] = new
            continue
        converted = ctx.inputs_after(name, done)
        # one pass over the paired patches: the converted inputs' covariance and the cross term
        cov, cross, n = wh.gram_pair(_layer_columns(dense, ctx.probe.inputs[name])[0], _layer_columns(dense, converted)[0])
        _set_factors(new, dense, wh.whitening(cov / n), int(p.rank), cross=cross / n)  # type: ignore[arg-type]
        done[name] = new
        ctx.fit_inputs[name] = converted


def convert_lowrank(ctx: Context) -> None:
    """Plan a rank per candidate (rule or budget), factorize, fill ``ctx.rows``/``ctx.new_modules``."""
    o = ctx.options
    plans = []
    for name, m in ctx.candidates:
        sch = o.scheme if isinstance(m, nn.Conv2d) else "svd"
        plans.append(_Plan(name, m, sch, _full_rank(m, sch)))
    if o.objective == "output":
        if not ctx.have_data:
            raise ValueError(
                "convert: objective='output' fits each layer to its calibration inputs: pass calibration= "
                "(a batch, a tensor or a DataLoader)"
            )
        for p in plans:
            _whiten(ctx, p)
    elif o.energy is not None or o.budget is not None:
        for p in plans:
            p.spectrum = _spectrum(p.module, p.scheme)
    cost_on = o.budget_on if o.budget is not None and o.budget_on != "latency" else "params"
    if o.budget is not None and o.budget_on == "latency":
        _plan_latency(plans, ctx)
    elif o.budget is not None:
        _plan_budget(plans, o.budget, o.budget_on, ctx.probe.in_shapes)
    else:
        for p in plans:
            r: Any = o.rank
            if isinstance(p.module, nn.Linear) and isinstance(r, (tuple, list)):
                r = int(min(r))
            elif isinstance(r, list):
                r = tuple(r)
            p.rank = pick_rank(p.spectrum, p.full, rank=r, energy=o.energy, ratio=o.ratio)  # type: ignore[arg-type]
            if p.scheme != "tucker2" and isinstance(p.rank, tuple):
                p.rank = int(min(p.rank))
            if o.rank_multiple > 1:
                p.rank = _round_up(p.rank, p.full, o.rank_multiple)
    for p in plans:
        m = p.module
        shape = ctx.probe.in_shapes.get(p.name)
        row = ctx.dense_row(p.name, m)
        if p.reason:
            row.status = p.reason
            continue
        assert p.rank is not None
        params_after = lowrank_cost(m, p.scheme, p.rank, shape, "params")
        flops_after = lowrank_cost(m, p.scheme, p.rank, shape, "flops")
        dense = dense_cost(m, shape, cost_on)
        fact = params_after if cost_on == "params" else flops_after
        if dense is not None and fact is not None and fact >= dense:
            row.status = "kept dense: factorized cost not lower"
            row.detail = {"rank": p.rank}
            continue
        why = ctx.not_worth_it(row, params_after, flops_after)
        if why is not None:
            row.status = why
            row.detail = {"rank": p.rank}
            continue
        if isinstance(m, nn.Conv2d):
            new: nn.Module = LowRankConv2d.from_dense(m, rank=p.rank, scheme=p.scheme)
        else:
            new = LowRankLinear.from_dense(m, rank=int(p.rank))  # type: ignore[arg-type]
        if p.whitening is not None and not o.sequential:
            _set_factors(new, m, p.whitening, int(p.rank))  # type: ignore[arg-type]
        spec = new.spec()  # type: ignore[operator]
        row.kind = spec["kind"]
        row.detail = {"scheme": p.scheme, "rank": p.rank, "objective": o.objective}
        if o.sequential:
            row.detail["sequential"] = True
        if p.latency is not None:
            row.detail.update(dense_ms=p.latency[0] * 1e3, converted_ms=p.latency[1] * 1e3)
        row.params_after = sum(q.numel() for q in new.parameters())
        row.flops_after = flops_after
        ctx.new_modules.append((p.name, new, spec))
    if o.sequential:
        _fit_sequentially(ctx, {p.name: p for p in plans})
    rows = {r.name: r for r in ctx.rows}
    for name, new, _ in ctx.new_modules:
        with torch.no_grad():
            rows[name].weight_rel_error = rel_err(new.dense_weight(), ctx.module(name).weight)  # type: ignore[operator]
