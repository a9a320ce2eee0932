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


def _lowrank(kind: str, dense: type[nn.Module], cls: type[nn.Module]) -> Builder:
    """Builder of a low-rank entry: an untrained ``cls.from_spec(entry)`` where a ``dense`` layer was."""

    def build(old: nn.Module, entry: dict[str, Any], root: nn.Module | None = None) -> nn.Module:
        if not isinstance(old, dense):
            raise ValueError(
                f"spec entry {entry['name']!r} ({kind}) expects an nn.{dense.__name__}, found {type(old).__name__}"
            )
        w = old.weight
        return cls.from_spec(entry).to(device=w.device, dtype=w.dtype)  # type: ignore[attr-defined]

    return build


def _fold(kind: str, lowrank: type[nn.Module]) -> Builder:
    """Builder of a fold-back entry: the dense layer that the low-rank one computes."""

    def build(old: nn.Module, entry: dict[str, Any], root: nn.Module | None = None) -> nn.Module:
        if isinstance(old, lowrank):
            return old.to_dense()  # type: ignore[operator]
        raise ValueError(
            f"spec entry {entry['name']!r} ({kind}) expects a {lowrank.__name__}, found {type(old).__name__}"
        )

    return build


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
    "lowrank_conv2d": _lowrank("lowrank_conv2d", nn.Conv2d, LowRankConv2d),
    "lowrank_linear": _lowrank("lowrank_linear", nn.Linear, LowRankLinear),
    "fold_conv2d": _fold("fold_conv2d", LowRankConv2d),
    "fold_linear": _fold("fold_linear", LowRankLinear),
    "acdc_linear": _build_acdc_linear,
    "acdc_conv1x1": _build_acdc_conv,
    "tied_bottleneck": _build_tied_bottleneck,
    "tied_mlp": _build_tied_mlp,
}
