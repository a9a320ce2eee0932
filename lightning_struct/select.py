"""Uniform layer selection shared by every callback and by model surgery.

Every callback that acts on layers takes the same three knobs:

* ``types``: layer classes the callback is able to handle (``nn.Conv2d``, ``nn.Linear`` ...),
* ``include``: name globs (``fnmatch``) of layers to select; ``None`` selects every layer
  of a supported type,
* ``exclude``: name globs removed from the selection.

A name that the user wrote *without* wildcards is a promise: if it names a layer whose type
is not supported, :func:`select_layers` raises (or, with ``on_unsupported="skip"``, warns and
skips it). An ``include`` glob that matches no supported layer raises too, so a typo never
silently selects nothing, and so does an ``exclude`` glob that matches no layer at all.

The module also finds the *trainable* tensor behind ``module.weight`` when the weight is
re-computed by ``torch.nn.utils.prune`` (``weight_orig``) or by a parametrization
(``parametrizations.weight.original``): see :func:`weight_parameter`.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable, Sequence
from typing import Literal

import torch
from torch import nn

log = logging.getLogger(__name__)

OnUnsupported = Literal["raise", "skip"]

_WILDCARDS = set("*?[")


def _as_list(value: str | Sequence[str] | None) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def _type_names(types: Iterable[type]) -> str:
    return ", ".join(sorted(t.__name__ for t in types))


def resolve_types(types: Sequence[type | str] | type | str | None, default: Sequence[type]) -> tuple[type, ...]:
    """Turn a list of classes or names (``"Conv2d"``, ``"torch.nn.Linear"``) into classes.

    Names without a dot are looked up in ``torch.nn``. Raises ``ValueError`` naming the bad entry.
    """
    if types is None:
        return tuple(default)
    if isinstance(types, (str, type)):
        types = [types]
    out: list[type] = []
    for t in types:
        if isinstance(t, type):
            out.append(t)
            continue
        name = str(t)
        if "." in name:
            mod_name, _, cls_name = name.rpartition(".")
            import importlib

            try:
                cls = getattr(importlib.import_module(mod_name), cls_name)
            except (ImportError, AttributeError) as err:
                raise ValueError(f"layer type {name!r} cannot be imported: {err}") from err
        else:
            cls = getattr(nn, name, None)
        if not isinstance(cls, type) or not issubclass(cls, nn.Module):
            raise ValueError(f"layer type {name!r} is not an nn.Module class (e.g. 'Conv2d', 'Linear')")
        out.append(cls)
    return tuple(out)


def select_layers(
    model: nn.Module,
    types: Sequence[type],
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    *,
    on_unsupported: OnUnsupported = "raise",
    supported: Sequence[type] | None = None,
    what: str = "layer selection",
) -> list[tuple[str, nn.Module]]:
    """Select ``(qualified_name, module)`` pairs of ``model`` in registration order.

    Args:
        model: the network to search.
        types: classes a layer must be an instance of to be selected.
        include: name globs; ``None`` means every layer of ``types``.
        exclude: name globs removed from the selection.
        on_unsupported: what to do with a layer named exactly in ``include`` whose type is not in
            ``supported``: ``"raise"`` (default) or ``"skip"`` (logged warning).
        supported: classes the caller can handle (defaults to ``types``).
        what: how the caller is called in error messages (e.g. ``"ForceRegularization"``).

    Raises:
        ValueError: an include glob matches no selectable layer, or an exactly named layer has an
            unsupported type (unless ``on_unsupported="skip"``).
    """
    if on_unsupported not in ("raise", "skip"):
        raise ValueError(f"{what}: on_unsupported={on_unsupported!r}; allowed: 'raise', 'skip'")
    types = tuple(types)
    supported = tuple(supported) if supported is not None else types
    inc = _as_list(include)
    exc = _as_list(exclude) or []
    modules = [(n, m) for n, m in model.named_modules() if n]
    by_name = dict(modules)

    # exact names that point at unsupported layers
    for pattern in inc or []:
        if _WILDCARDS & set(pattern):
            continue
        if pattern not in by_name:
            continue
        module = by_name[pattern]
        if not isinstance(module, supported):
            msg = (
                f"{what}: layer {pattern!r} ({type(module).__name__}) is selected but not supported; "
                f"supported layer types: {_type_names(supported)}"
            )
            if on_unsupported == "raise":
                raise ValueError(msg + " (pass on_unsupported='skip' to skip it with a warning)")
            log.warning(msg + "; skipped")

    selected: list[tuple[str, nn.Module]] = []
    matched: dict[str, int] = {p: 0 for p in inc or []}
    for name, module in modules:
        if not isinstance(module, types) or not isinstance(module, supported):
            continue
        if inc is not None:
            hits = [p for p in inc if fnmatch.fnmatchcase(name, p)]
            if not hits:
                continue
            for p in hits:
                matched[p] += 1
        if any(fnmatch.fnmatchcase(name, p) for p in exc):
            continue
        selected.append((name, module))

    typos = [p for p in exc if not any(fnmatch.fnmatchcase(n, p) for n in by_name)]
    if typos:
        shown = ", ".join(list(by_name)[:12]) + (" ..." if len(by_name) > 12 else "")
        raise ValueError(
            f"{what}: exclude pattern(s) {typos} match no layer of {type(model).__name__} (a typo would "
            f"silently exclude nothing); layers: [{shown}]"
        )
    unmatched = [p for p, count in matched.items() if count == 0 and not (p in by_name and on_unsupported == "skip")]
    if unmatched:
        candidates = [n for n, m in modules if isinstance(m, types)]
        shown = ", ".join(candidates[:12]) + (" ..." if len(candidates) > 12 else "")
        raise ValueError(
            f"{what}: include pattern(s) {unmatched} match no {_type_names(types)} layer of "
            f"{type(model).__name__}; layers of that type: [{shown}]"
        )
    return selected


def weight_parameter(module: nn.Module, name: str = "weight") -> torch.nn.Parameter:
    """The trainable Parameter behind ``module.<name>``.

    Handles plain parameters, ``torch.nn.utils.prune`` (``<name>_orig``) and
    ``torch.nn.utils.parametrize`` (``parametrizations.<name>.original``). Raises ``TypeError``
    naming the module when there is no such parameter.
    """
    params = getattr(module, "parametrizations", None)
    if params is not None and name in params:
        return params[name].original
    orig = module._parameters.get(f"{name}_orig")
    if orig is not None:
        return orig
    p = module._parameters.get(name)
    if isinstance(p, nn.Parameter):
        return p
    raise TypeError(f"{type(module).__name__} has no trainable parameter {name!r}")


def exclude_ends(
    model: nn.Module, include: str | Sequence[str] | None, exclude: str | Sequence[str] | None
) -> tuple[list[str], list[str]]:
    """``exclude`` plus, when ``include`` is not given, the first conv (the stem) and the last ``Linear``.

    The default of every callback and of ``convert`` that picks layers by type (as Wen et al. left
    the first and last layers alone). Returns ``(exclude patterns, the names added)``.
    """
    patterns = _as_list(exclude) or []
    if include is not None:
        return patterns, []
    first, last = first_and_last(model, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    added = [n for n in (first, last) if n is not None and n not in patterns]
    return patterns + added, added


def first_and_last(model: nn.Module, types: Sequence[type]) -> tuple[str | None, str | None]:
    """Names of the first layer of ``types`` and of the last ``nn.Linear`` (the classifier)."""
    first = next((n for n, m in model.named_modules() if n and isinstance(m, tuple(types))), None)
    last = None
    for n, m in model.named_modules():
        if n and isinstance(m, nn.Linear):
            last = n
    return first, last


class InputSizeRecorder:
    """Record the spatial input size of layers from the next forward pass, then unhook.

    Use as a context manager around one forward pass (a dry run), or call :meth:`attach`, let a
    real training batch fill it, and :meth:`detach` once :attr:`complete`: each hook records
    ``input.shape[2:]`` of its layer on its first call only.

    Attributes:
        sizes: ``{layer name: spatial size tuple}`` (``()`` for ``nn.Linear``).
    """

    def __init__(self, layers: Sequence[tuple[str, nn.Module]]) -> None:
        self.layers = list(layers)
        self.sizes: dict[str, tuple[int, ...]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def attach(self) -> InputSizeRecorder:
        for name, module in self.layers:
            if name in self.sizes:
                continue

            def hook(mod: nn.Module, args: tuple, _name: str = name) -> None:
                if _name not in self.sizes and args and isinstance(args[0], torch.Tensor):
                    self.sizes[_name] = tuple(int(s) for s in args[0].shape[2:])

            self._handles.append(module.register_forward_pre_hook(hook))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @property
    def complete(self) -> bool:
        return all(name in self.sizes for name, _ in self.layers)

    def __enter__(self) -> InputSizeRecorder:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()
