"""Tied conversion (Koyun & Toreyin 2024): bottlenecks and MLPs as ``W^T G(W x)``.

Least-squares initialisation of the shared ``W`` from the two dense 1x1 / linear weights; blocks
whose shapes cannot be tied stay dense (or raise when named exactly in ``include``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_struct.nn import tied
from lightning_struct.surgery._context import Context
from lightning_struct.surgery.costs import n_params
from lightning_struct.surgery.report import LayerReport

__all__ = ["convert_tied", "tied_support"]


def tied_support(name: str, m: nn.Module) -> str | None:
    """Why ``m`` cannot be tied (``None`` when it can)."""
    from torchvision.models.resnet import Bottleneck
    from torchvision.models.vision_transformer import MLPBlock

    try:
        if isinstance(m, Bottleneck):
            tied.check_tieable_bottleneck(m)
        elif not isinstance(m, MLPBlock):
            raise ValueError(f"{type(m).__name__} is neither a torchvision Bottleneck nor a ViT MLPBlock")
    except ValueError as err:
        return str(err)
    return None


def convert_tied(ctx: Context) -> None:
    """Tie every tieable candidate (one ``W`` per block, or per stage); fill ``ctx.rows``/``ctx.new_modules``."""
    from torchvision.models.resnet import Bottleneck

    staged = ctx.options.tied_staged
    stages: dict[str, list[tuple[str, nn.Module, LayerReport]]] = {}
    for name, m in ctx.candidates:
        row = ctx.dense_row(name, m, with_flops=False)
        why = tied_support(name, m)
        if why is not None:
            if name in ctx.exact:
                raise ValueError(f"convert(method='tied'): layer {name!r} cannot be tied: {why}")
            row.status = f"kept dense: {why}"
            continue
        if isinstance(m, Bottleneck):
            if staged:
                stages.setdefault(name.rpartition(".")[0], []).append((name, m, row))
                continue
            new, kind = tied.TiedBottleneck.from_bottleneck(m), "tied_bottleneck"
        else:
            new, kind = tied.TiedMLP.from_mlp(m), "tied_mlp"
        why = ctx.not_worth_it(row, n_params(new), None)
        if why is not None:
            row.status = why
            continue
        row.kind = kind
        row.params_after = n_params(new)
        ctx.new_modules.append((name, new, {"kind": kind}))
    # staged sharing: one least-squares W per stage (the blocks of one parent container)
    for members in stages.values():
        news = tied.TiedBottleneck.from_bottlenecks([m for _, m, _ in members])
        first = members[0][0]
        for i, ((name, _, row), new) in enumerate(zip(members, news)):
            row.kind = "tied_bottleneck"
            row.detail = {"shared_W_with": first} if i else {"shared_W": f"{len(members)} blocks"}
            # the shared W is counted once, in the first block of the stage
            row.params_after = n_params(new) - (new.weight.numel() if i else 0)
            entry: dict[str, Any] = {"kind": "tied_bottleneck"}
            if i:
                entry["share_with"] = first
            ctx.new_modules.append((name, new, entry))


