"""Small helpers for working on a module tree: evaluation mode for a while, replace a layer."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TypeVar

from torch import nn

__all__ = ["eval_mode", "set_submodule"]

_M = TypeVar("_M", bound=nn.Module)


@contextlib.contextmanager
def eval_mode(module: _M) -> Iterator[_M]:
    """Put ``module`` in eval mode for the ``with`` block; yields ``module``.

    Afterwards every submodule gets back its own ``training`` flag (not simply
    ``module.train()``: a model may keep some parts in eval mode on purpose, e.g. frozen
    BatchNorm layers).
    """
    flags = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield module
    finally:
        for m, flag in flags.items():
            m.training = flag


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at the dotted path ``name`` of ``root`` (e.g. ``"layer1.0.conv2"``); returns
    the module it replaces.

    Raises:
        AttributeError: the path does not exist; the message names the children of the module
            where the path breaks off (``nn.Module.get_submodule`` raises the same type).
        ValueError: ``name`` is empty (``root`` itself cannot be replaced in place).
    """
    if not name:
        raise ValueError(f"set_submodule: empty layer name; a submodule of {type(root).__name__} is needed")
    parts = name.split(".")
    parent = root
    for depth, part in enumerate(parts):
        children = dict(parent.named_children())
        if part not in children:
            at = ".".join(parts[:depth])
            owner = f"{type(root).__name__}.{at}" if at else type(root).__name__
            raise AttributeError(
                f"set_submodule: {type(root).__name__} has no submodule {name!r}: {owner} has no child "
                f"{part!r}; its children: {list(children)}"
            )
        if depth < len(parts) - 1:
            parent = children[part]
    old = children[parts[-1]]
    setattr(parent, parts[-1], new)
    return old
