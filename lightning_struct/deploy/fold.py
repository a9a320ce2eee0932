"""Make a trained (possibly converted) network cheaper to run before it is exported.

* :func:`fold_fft` - FFT convolutions back to the ``nn.Conv{1,2}d`` they are (same Parameters).
* :func:`fold_batchnorm` - a ``BatchNorm`` that only reads the output of a conv (``nn.Conv{1,2}d``,
  or the last factor of a :class:`~lightning_struct.nn.LowRankConv2d`) is folded into that conv's
  weight and bias and replaced by ``nn.Identity`` (eval-mode statistics; exact up to rounding).
* :func:`fold_dense` - converted layers back to the dense layer they compute (low-rank always;
  ACDC only when ReLU-free).
* :func:`fold_slower` - the same for only the layers that time slower than their dense form
  on their real input shape in a given runtime.

All of them work in place on an eval-mode model and return the names they changed. The pattern
search of :func:`fold_batchnorm` reads the model's ``torch.fx`` graph; a model fx cannot trace
simply keeps its BatchNorms (runtimes such as onnxruntime fuse Conv+BatchNormalization themselves).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lightning_struct.nn.acdc import ACDCConv1x1, ACDCStack
from lightning_struct.nn.fftconv import FFTConvNd
from lightning_struct.nn.lowrank import LowRankConv2d, LowRankLinear
from lightning_struct.nn.tied import TiedBottleneck, TiedMLP
from lightning_struct.nn.utils import set_submodule

__all__ = ["DENSE_FOLDABLE", "fold_batchnorm", "fold_dense", "fold_fft", "fold_slower", "to_dense"]

_CONVS = (nn.Conv1d, nn.Conv2d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
DENSE_FOLDABLE = (LowRankConv2d, LowRankLinear, ACDCStack, ACDCConv1x1)
_OURS = (*DENSE_FOLDABLE, FFTConvNd, TiedBottleneck, TiedMLP)


def fold_fft(model: nn.Module) -> list[str]:
    """Replace every FFT convolution by its direct convolution (the same Parameters)."""
    names = [n for n, m in model.named_modules() if isinstance(m, FFTConvNd)]
    for name in names:
        set_submodule(model, name, model.get_submodule(name).to_conv())  # type: ignore[operator]
    return names


def _last_conv(module: nn.Module) -> nn.Module | None:
    if isinstance(module, _CONVS) and not isinstance(module, FFTConvNd):
        return module
    if isinstance(module, LowRankConv2d):
        return module.factors[-1]
    return None


@torch.no_grad()
def _fold_into(conv: nn.Module, bn: nn.Module) -> None:
    if bn.running_var is None or bn.running_mean is None:
        raise ValueError("fold_batchnorm: a BatchNorm without running statistics cannot be folded")
    scale = bn.running_var.add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    w = conv.weight  # type: ignore[union-attr]
    w.mul_(scale.reshape(-1, *([1] * (w.ndim - 1))).to(w.dtype))
    if conv.bias is None:  # type: ignore[union-attr]
        conv.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
    conv.bias.mul_(scale.to(w.dtype)).add_(shift.to(w.dtype))  # type: ignore[union-attr]


class _Tracer(torch.fx.Tracer):
    """Our layers stay single nodes (``call_module``), so a BN after a LowRankConv2d is seen as such."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _OURS) or super().is_leaf_module(m, module_qualified_name)


def fold_batchnorm(model: nn.Module) -> list[str]:
    """Fold each eval-mode BatchNorm whose only input is a conv's output into that conv.

    Returns ``"conv -> bn"`` for each fold. A model that ``torch.fx`` cannot trace is left alone.
    """
    if model.training:
        raise ValueError("fold_batchnorm: call model.eval() first (training BatchNorm uses batch statistics)")
    try:
        graph = _Tracer().trace(model)
    except Exception:  # noqa: BLE001 - any tracing failure just means "no pattern search"
        return []
    folded: list[str] = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(model.get_submodule(node.target), _NORMS):
            continue
        src = node.args[0] if node.args else None
        if not isinstance(src, torch.fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        bn = model.get_submodule(node.target)
        conv = _last_conv(model.get_submodule(src.target))
        if conv is None or not bn.track_running_stats or conv.weight.shape[0] != bn.num_features:
            continue
        _fold_into(conv, bn)
        set_submodule(model, node.target, nn.Identity())
        folded.append(f"{src.target} -> {node.target}")
    return folded


def to_dense(module: nn.Module) -> nn.Module | None:
    """The dense layer a converted layer computes, or ``None`` when it is not a linear map (ReLU ACDC)."""
    if isinstance(module, ACDCStack) and module.relu and module.n_factors > 1:
        return None
    if isinstance(module, ACDCConv1x1) and module.stack.relu and module.stack.n_factors > 1:
        return None
    if isinstance(module, DENSE_FOLDABLE):
        return module.to_dense()  # type: ignore[operator]
    return None


def fold_dense(model: nn.Module, names: Iterable[str]) -> list[str]:
    """Replace the named converted layers by their dense equivalents (those that have one)."""
    done: list[str] = []
    for name in names:
        dense = to_dense(model.get_submodule(name))
        if dense is not None:
            set_submodule(model, name, dense)
            done.append(name)
    return done


def fold_slower(model: nn.Module, example_input: torch.Tensor, runtime: str = "eager") -> list[str]:
    """Fold back the converted layers that are slower than their dense form in ``runtime``.

    Each layer is timed alone on the input shape it sees when ``model`` runs ``example_input``
    (:func:`lightning_struct.deploy.runtime.time_modules`). Returns the folded names.
    """
    from lightning_struct.deploy.runtime import time_modules

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, DENSE_FOLDABLE) and to_dense(m) is not None]
    shapes: dict[str, tuple[int, ...]] = {}
    def recorder(name: str) -> Any:
        def record(_m: nn.Module, args: tuple[Any, ...]) -> None:  # returns None: the inputs pass unchanged
            shapes.setdefault(name, tuple(args[0].shape))

        return record

    handles = [m.register_forward_pre_hook(recorder(n)) for n, m in layers]
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
    slower = []
    for name, m in layers:
        if name not in shapes:
            continue
        t = time_modules({"converted": m, "dense": to_dense(m)}, shapes[name], runtime)  # type: ignore[dict-item]
        if t["dense"] <= t["converted"]:
            slower.append(name)
    return fold_dense(model, slower)
