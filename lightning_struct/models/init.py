"""Start a run from weights only: ``init_ckpt=`` (a lightning-struct / Lightning checkpoint or a state dict).

Unlike ``ckpt_path=`` (which resumes: optimizer, schedule, epoch, callbacks), this loads the
network's weights and nothing else, the way a paper's "fine-tune a trained network" starts.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_struct.surgery import SPEC_KEY, apply_spec

__all__ = ["InitReport", "load_init_weights"]

log = logging.getLogger(__name__)

_WRAPPERS = ("module.", "_orig_mod.")  # DDP / torch.compile prefixes


@dataclass
class InitReport:
    """What :func:`load_init_weights` loaded into which module."""

    target: str  # "" (the module itself) or "net"
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the file
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model
    mismatched: list[str] = field(default_factory=list)  # in both, different shapes
    converted: bool = False  # a conversion spec was found and its structure rebuilt first

    def __str__(self) -> str:
        where = f"model.{self.target}" if self.target else "the model"
        text = f"init: {len(self.loaded)} tensors loaded into {where}"
        for name, keys in (("kept as initialised", self.missing + self.mismatched), ("ignored", self.unexpected)):
            if keys:
                text += f"; {len(keys)} {name} ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})"
        return text


def _read(source: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"init_ckpt={str(path)!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as err:
        raise ValueError(f"init_ckpt={str(path)!r} is not a readable checkpoint or state dict: {type(err).__name__}: {str(err)[:200]}") from err
    if not isinstance(obj, Mapping):
        raise ValueError(f"init_ckpt={str(path)!r} holds a {type(obj).__name__}, not a checkpoint or state dict")
    return dict(obj)


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _WRAPPERS:
            if key.startswith(p):
                key, changed = key[len(p) :], True
    return key


def _listing(keys: list[str]) -> str:
    return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def load_init_weights(
    model: nn.Module, source: str | os.PathLike[str] | Mapping[str, Any], *, strict: bool = True
) -> InitReport:
    """Load weights (only) into ``model`` from a checkpoint or a plain state dict.

    Args:
        model: a LightningModule with a ``net`` (e.g. :class:`ImageClassifier`) or any ``nn.Module``.
        source: a ``lightning-struct train`` checkpoint, any Lightning checkpoint (its
            ``state_dict``), a ``save_converted`` file, or a plain ``state_dict`` file (e.g. a
            torchvision ``.pth``: keys without the ``net.`` prefix load into ``model.net``).
            A converted checkpoint rebuilds its low-rank / ACDC / tied structure first.
        strict: every key must match in name and shape. ``False``: load the keys that match and
            keep the rest as initialised (e.g. a pretrained backbone with a new classifier head
            for another number of classes); what was skipped is in the report and the log.

    Raises:
        ValueError: with ``strict``, when keys are missing, unexpected or of another shape (a
            few of each are listed), or when nothing at all matches.
    """
    ckpt = _read(source)
    raw = ckpt.get("state_dict", ckpt)
    if not isinstance(raw, Mapping):
        raise ValueError("init_ckpt: the file's 'state_dict' is not a mapping")
    sd = {_strip(k): v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    net = getattr(model, "net", None)
    use_net = isinstance(net, nn.Module) and not any(k.startswith("net.") for k in sd)
    target: nn.Module = net if use_net else model  # type: ignore[assignment]
    report = InitReport(target="net" if use_net else "")
    spec = ckpt.get(SPEC_KEY)
    if spec:
        layers = spec.get("layers", []) if isinstance(spec, Mapping) else []
        on_net = use_net or (isinstance(net, nn.Module) and layers and not all(e["name"].startswith("net.") for e in layers))
        apply_spec(net if on_net else model, spec)  # type: ignore[arg-type]
        report.converted = True
    own = target.state_dict()
    report.missing = [k for k in own if k not in sd]
    report.unexpected = [k for k in sd if k not in own]
    report.mismatched = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    load = {k: v for k, v in sd.items() if k in own and k not in report.mismatched}
    problems = []
    if report.missing:
        problems.append(f"missing in the file: {_listing(report.missing)}")
    if report.unexpected:
        problems.append(f"not in the model: {_listing(report.unexpected)}")
    if report.mismatched:
        problems.append(
            "other shapes: " + _listing([f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in report.mismatched])
        )
    if not load:
        raise ValueError(f"init_ckpt: no key of the file matches the model ({'; '.join(problems)})")
    if strict and problems:
        raise ValueError(
            "init_ckpt: the file does not match the model: " + "; ".join(problems)
            + ". To load only the tensors that match (e.g. a new classifier head for another num_classes), "
            "set init_strict=false"
        )
    target.load_state_dict(load, strict=False)
    report.loaded = sorted(load)
    log.info("%s", report)
    return report
