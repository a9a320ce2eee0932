"""The builder table: how each spec entry kind is rebuilt (untrained) from the module it replaced.

``BUILDERS[kind](old_module, entry, root)`` returns the new module, structurally identical to the
converted one; ``root`` is the model being rebuilt (for entries that share parameters with an
earlier entry). The weights arrive afterwards with ``load_state_dict``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from lightning_struct.nn import acdc, tied
from lightning_struct.nn.lowrank import LowRankConv2d, LowRankLinear

__all__ = ["BUILDERS", "Builder"]

Builder = Callable[[nn.Module, dict[str, Any], nn.Module], nn.Module]


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
    w = old.weight  # type: ignore[union-attr]
    return acdc.ACDCStack(entry["in_features"], entry["out_features"], **_acdc_kwargs(entry)).to(
        device=w.device, dtype=w.dtype
    )


def _build_acdc_conv(old: nn.Module, entry: dict[str, Any], root: nn.Module | None = None) -> nn.Module:
    w = old.weight  # type: ignore[union-attr]
    return acdc.ACDCConv1x1(
        entry["in_channels"], entry["out_channels"], stride=int(entry.get("stride", 1)), **_acdc_kwargs(entry)
    ).to(device=w.device, dtype=w.dtype)


def _build_tied_bottleneck(old: nn.Module, entry: dict[str, Any], root: nn.Module | None = None) -> nn.Module:
    new = tied.TiedBottleneck.from_bottleneck(old)
    share = entry.get("share_with")
    if share:
        if root is None:
            raise ValueError(
                f"spec entry {entry['name']!r} shares W with {share!r} but no root model was given"
            )
        new.share_weight(root.get_submodule(share).weight)
    return new


def _build_tied_mlp(old: nn.Module, entry: dict[str, Any], root: nn.Module | None = None) -> nn.Module:
    return tied.TiedMLP.from_mlp(old)



BUILDERS: dict[str, Builder] = {
    "lowrank_conv2d": _build_lowrank_conv,
    "lowrank_linear": _build_lowrank_linear,
    "fold_conv2d": _build_dense_conv,
    "fold_linear": _build_dense_linear,
    "acdc_linear": _build_acdc_linear,
    "acdc_conv1x1": _build_acdc_conv,
    "tied_bottleneck": _build_tied_bottleneck,
    "tied_mlp": _build_tied_mlp,
}
