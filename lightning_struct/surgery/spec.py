"""The conversion spec: which layer became what, so a checkpoint can be rebuilt.

A converted model keeps its factors (fewer parameters is the point), so its ``state_dict`` has
keys the dense architecture does not know (``conv.first.weight`` ...). The *spec* is the list of
replacements applied, in order, as JSON-serialisable dicts::

    {"format": 1, "layers": [
        {"name": "net.features.conv2", "kind": "lowrank_conv2d", "scheme": "channel", "rank": 12, ...},
        {"name": "net.classifier.fc2", "kind": "acdc_linear", "n_factors": 12, ...},
    ]}

Names are relative to the module the spec is read from. :func:`convert` stores the entries on
the module it converted (attribute :data:`SPEC_ATTR`); :func:`get_spec` gathers the entries of a
whole model (prefixing names of converted sub-modules), the callbacks write it into every
checkpoint under :data:`SPEC_KEY`, and :func:`apply_spec` replays it on a freshly built dense
model before the weights load. Only plain types are stored, so checkpoints keep loading with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from torch import nn

from lightning_struct.nn.utils import set_submodule
from lightning_struct.surgery.builders import BUILDERS, Builder

#: top-level checkpoint key holding the spec
SPEC_KEY = "lightning_struct_conversion"
#: attribute of a converted module holding its list of entries
SPEC_ATTR = "lightning_struct_conversion"
SPEC_FORMAT = 1

Entry = dict[str, Any]

__all__ = [
    "SPEC_ATTR",
    "SPEC_FORMAT",
    "SPEC_KEY",
    "apply_entries",
    "apply_spec",
    "get_spec",
    "get_submodule",
    "record",
    "register_builder",
    "replace_module",
    "strip_prefix",
]

#: entry fields holding layer names (prefixed / stripped together with ``name``)
NAME_FIELDS = ("name", "share_with")


def register_builder(kind: str, builder: Builder) -> None:
    """Add (or replace) how entries of ``kind`` are rebuilt; see :mod:`.builders`."""
    BUILDERS[kind] = builder


def _builder(kind: str) -> Builder:
    if kind not in BUILDERS:
        raise ValueError(f"conversion spec: unknown layer kind {kind!r}; known: {sorted(BUILDERS)}")
    return BUILDERS[kind]


def get_submodule(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule(name)`` with an error naming the model's top-level children."""
    try:
        return model.get_submodule(name)
    except AttributeError as err:
        children = [n for n, _ in model.named_children()]
        raise ValueError(
            f"conversion spec names layer {name!r}, which {type(model).__name__} does not have "
            f"(top-level children: {children}); was the spec written for another model, or for the "
            f"LightningModule instead of the bare net (see load_converted's `prefix`)?"
        ) from err


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at the dotted path ``name`` of ``model``; returns the old module."""
    get_submodule(model, name)  # the spec-aware error when the path does not exist
    return set_submodule(model, name, new)


def record(module: nn.Module, entries: list[Entry]) -> None:
    """Append entries (names relative to ``module``) to the spec stored on ``module``."""
    current = list(getattr(module, SPEC_ATTR, None) or [])
    current.extend(copy.deepcopy(entries))
    object.__setattr__(module, SPEC_ATTR, current)


def get_spec(model: nn.Module) -> dict[str, Any] | None:
    """The full spec of ``model`` (entries of converted sub-modules prefixed), or ``None``."""
    layers: list[Entry] = []
    for prefix, module in model.named_modules():
        entries = getattr(module, SPEC_ATTR, None)
        if not entries:
            continue
        for e in entries:
            e = dict(e)
            for f in NAME_FIELDS:
                if prefix and e.get(f):
                    e[f] = f"{prefix}.{e[f]}"
            layers.append(e)
    if not layers:
        return None
    return {"format": SPEC_FORMAT, "layers": layers}


def _clear(model: nn.Module) -> None:
    for module in model.modules():
        if getattr(module, SPEC_ATTR, None) is not None:
            object.__setattr__(module, SPEC_ATTR, [])


def strip_prefix(spec: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The spec with ``prefix`` (e.g. ``"net."``) removed from every layer name.

    Raises ``ValueError`` naming a layer that does not start with the prefix.
    """
    out = []
    for e in spec["layers"]:
        if not e["name"].startswith(prefix):
            raise ValueError(f"conversion spec layer {e['name']!r} does not start with prefix {prefix!r}")
        e = dict(e)
        for f in NAME_FIELDS:
            if e.get(f):
                e[f] = e[f][len(prefix) :]
        out.append(e)
    return {"format": spec.get("format", SPEC_FORMAT), "layers": out}


def apply_entries(model: nn.Module, entries: list[Entry]) -> nn.Module:
    """Replay spec ``entries`` (names relative to ``model``) on top of ``model``'s current structure.

    The modules are built untrained, on the device and dtype of those they replace, and the
    entries are appended to ``model``'s spec. Used where one process converted and the others
    must build the same structure (DDP: rank 0 converts, the other ranks replay its entries).
    """
    _replay(model, entries)
    record(model, [dict(e) for e in entries])
    return model


def _replay(model: nn.Module, entries: list[Entry]) -> None:
    for entry in entries:
        old = get_submodule(model, entry["name"])
        new = _builder(entry["kind"])(old, entry, model)
        replace_module(model, entry["name"], new)


def apply_spec(model: nn.Module, spec: Mapping[str, Any]) -> nn.Module:
    """Rebuild the converted structure described by ``spec`` on a dense ``model`` (in place).

    Entries are replayed in order; each replaces the dense module at its name with an
    untrained module of the recorded kind and hyper-parameters. The spec is then attached to
    ``model`` (so a later checkpoint carries it again). A model that already carries exactly this
    spec is left alone (idempotent), so the callbacks can call this safely on resume.

    Raises:
        ValueError: unknown format/kind, or a name that ``model`` does not have.
    """
    if not isinstance(spec, Mapping) or "layers" not in spec:
        raise ValueError(f"not a conversion spec (expected a mapping with 'layers'): {type(spec).__name__}")
    if int(spec.get("format", SPEC_FORMAT)) > SPEC_FORMAT:
        raise ValueError(
            f"conversion spec format {spec.get('format')} is newer than this lightning-struct "
            f"(supports <= {SPEC_FORMAT}); upgrade lightning-struct"
        )
    current = get_spec(model)
    if current is not None and current["layers"] == list(spec["layers"]):
        return model
    if current is not None:
        raise ValueError(
            "apply_spec: the model is already converted with a different spec; build a fresh dense model first"
        )
    _replay(model, spec["layers"])
    _clear(model)
    record(model, [dict(e) for e in spec["layers"]])
    return model
