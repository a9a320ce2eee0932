"""ACDC conversion: a fresh identity-centred ACDC stack per layer, fitted by layer-wise distillation.

Only Linear layers and plain 1x1 convs (ungrouped, unpadded, equal strides) are replaced. The
stack is fitted with Adam to the dense layer's input/output pairs recorded on the calibration
batches; without calibration the inputs are standard normal samples (said in the row's detail).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lightning_struct.nn import acdc
from lightning_struct.ops import factorize as fz
from lightning_struct.surgery._context import Context
from lightning_struct.surgery.costs import acdc_flops, n_params, rows_of

__all__ = ["acdc_support", "convert_acdc"]


def acdc_support(name: str, m: nn.Module) -> str | None:
    """Why ``m`` cannot be replaced by ACDC (``None`` when it can)."""
    if isinstance(m, nn.Linear):
        return None
    if isinstance(m, nn.Conv2d):
        st = m.stride
        ok = m.kernel_size == (1, 1) and m.groups == 1 and st[0] == st[1]
        ok = ok and (m.padding == (0, 0) or m.padding == "valid") and m.padding_mode == "zeros"
        if ok:
            return None
        return (
            f"layer {name!r} is a {m.kernel_size} conv (stride {st}, groups {m.groups}, padding {m.padding}); "
            f"ACDC replaces only 1x1, ungrouped, unpadded convs (equal strides) and Linear layers"
        )
    return f"layer {name!r} is a {type(m).__name__}; ACDC replaces only Linear layers and plain 1x1 convs"


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


def convert_acdc(ctx: Context) -> None:
    """Build and fit one ACDC stack per supported candidate; fill ``ctx.rows``/``ctx.new_modules``."""
    o = ctx.options
    hp = {"n_factors": o.acdc_factors, "relu": o.acdc_relu, "permute": o.acdc_permute, "sigma": o.acdc_sigma,
          "seed": o.seed}  # fmt: skip
    for name, m in ctx.candidates:
        shape = ctx.probe.in_shapes.get(name)
        row = ctx.dense_row(name, m)
        bias = getattr(m, "bias", None) is not None
        why = acdc_support(name, m)
        if why is not None:
            if name in ctx.exact:
                raise ValueError(f"convert(method='acdc'): {why}")
            row.status = "kept dense: not a plain 1x1 conv"
            continue
        if isinstance(m, nn.Conv2d):
            st = m.stride
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
            rows_per_example = rows_of(shape)
        w = m.weight
        new = new.to(device=w.device, dtype=w.dtype)
        flops = acdc_flops(o.acdc_factors, size, rows_per_example) if shape is not None else None
        why = ctx.not_worth_it(row, n_params(new), flops)
        if why is not None:  # decided before the (costly) fit
            row.status = why
            continue
        if ctx.have_data and name in ctx.probe.inputs:
            xs = ctx.probe.inputs[name]
            source = "calibration"
        else:
            in_dim = m.in_channels if isinstance(m, nn.Conv2d) else m.in_features
            gen = torch.Generator(device="cpu").manual_seed(o.seed)
            x = torch.randn(512, in_dim, generator=gen, dtype=w.dtype)
            if isinstance(m, nn.Conv2d):
                x = x[:, :, None, None]
            xs = [x.to(w.device)]
            source = "synthetic N(0,1)"
        first, last = _fit_acdc(new, m, xs, o.acdc_steps, o.acdc_lr, o.seed)
        row.kind = entry["kind"]
        row.detail = {"n_factors": o.acdc_factors, "fit": source, "fit_loss": f"{first:.3g}->{last:.3g}"}
        row.params_after = n_params(new)
        if flops is not None:
            row.flops_after = flops
        ctx.new_modules.append((name, new, entry))

