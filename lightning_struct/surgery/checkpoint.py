"""Saving and reloading converted models: rebuild the structure from the spec, then load weights.

Key prefixes. A Lightning checkpoint stores the LightningModule's ``state_dict`` (``net.`` +
the network's keys for :class:`~lightning_struct.models.ImageClassifier`) and a spec whose
layer names are relative to the LightningModule too. :func:`load_converted` accepts either the
LightningModule or the bare network: it picks the prefix to strip (e.g. ``"net."``) or the
child to load into by matching the checkpoint's keys against the model's, or takes an explicit
``prefix``. Keys outside the prefix (e.g. other heads of the LightningModule) are then ignored.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_struct.surgery import spec as specmod

__all__ = ["load_converted", "restore_structure", "save_converted"]


def _load(
    path_or_checkpoint: str | os.PathLike[str] | Mapping[str, Any], map_location: Any
) -> dict[str, Any]:
    if isinstance(path_or_checkpoint, Mapping):
        return dict(path_or_checkpoint)
    path = Path(path_or_checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"load_converted: checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (UnicodeDecodeError, EOFError, OSError, pickle.UnpicklingError, RuntimeError, ValueError) as err:
        raise ValueError(
            f"load_converted: {str(path)!r} is not a readable checkpoint (corrupted or truncated file?): "
            f"{type(err).__name__}: {str(err)[:200]}"
        ) from err
    if not isinstance(ckpt, Mapping):
        raise ValueError(
            f"load_converted: {str(path)!r} holds a {type(ckpt).__name__}, not a checkpoint dict"
        )
    return dict(ckpt)


def _state_dict_of(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    sd = ckpt.get("state_dict", ckpt)
    if not isinstance(sd, Mapping):
        raise ValueError("load_converted: the checkpoint's 'state_dict' is not a mapping")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _candidates(model: nn.Module, keys: list[str]) -> list[tuple[str, str]]:
    """(child of model to load into, prefix to strip from the checkpoint keys) pairs to try."""
    out = [("", "")]
    prefixes = set()
    for k in keys:
        parts = k.split(".")
        for i in range(1, min(len(parts), 4)):
            prefixes.add(".".join(parts[:i]) + ".")
    out += [("", p) for p in sorted(prefixes, key=len)]
    out += [(name, "") for name, _ in model.named_modules() if name and name.count(".") < 3]
    return out


def _resolve_target(
    model: nn.Module, keys: list[str], spec: Mapping[str, Any] | None, prefix: str | None
) -> tuple[nn.Module, str]:
    if prefix is not None:
        return model, prefix
    names = [e["name"] for e in spec["layers"]] if spec else []
    best: tuple[int, int, nn.Module, str] | None = None
    for i, (child, strip) in enumerate(_candidates(model, keys)):
        target = model.get_submodule(child) if child else model
        stripped = {k[len(strip) :] for k in keys if k.startswith(strip)}
        if not stripped:
            continue
        # spec names must resolve in the target
        ok = True
        for n in names:
            if not n.startswith(strip):
                ok = False
                break
            try:
                target.get_submodule(n[len(strip) :])
            except AttributeError:
                ok = False
                break
        if not ok:
            continue
        overlap = len(stripped & set(target.state_dict().keys()))
        score = (overlap, -i)
        if best is None or score > best[:2]:
            best = (overlap, -i, target, strip)
    if best is None or (best[0] == 0 and not names):
        raise ValueError(
            "load_converted: the checkpoint's keys (e.g. "
            f"{keys[:3]}) match neither {type(model).__name__} nor one of its children, with or without a "
            "prefix; pass `prefix=` explicitly (e.g. prefix='net.' to load a LightningModule checkpoint "
            "into the bare network)"
        )
    return best[2], best[3]


def load_converted(
    path_or_checkpoint: str | os.PathLike[str] | Mapping[str, Any],
    model: nn.Module,
    *,
    prefix: str | None = None,
    strict: bool = True,
    fold: bool = False,
    map_location: Any = "cpu",
) -> nn.Module:
    """Rebuild the converted structure recorded in a checkpoint on ``model``, then load the weights.

    Args:
        path_or_checkpoint: a Lightning ``.ckpt`` path, a checkpoint dict, or a file written by
            :func:`save_converted` (``{"state_dict", "lightning_struct_conversion"}``). A checkpoint
            without a spec loads like a plain (dense) one.
        model: a freshly built *dense* model of the same architecture: the LightningModule
            (e.g. ``ImageClassifier(digits_cnn(), 10)``) or the bare network (``digits_cnn()``).
        prefix: prefix to strip from the checkpoint's layer names and keys (``"net."`` to load a
            LightningModule checkpoint into the bare net); found automatically when ``None``.
        strict: passed to ``load_state_dict`` (after the prefix is stripped).
        fold: fold low-rank layers back to dense after loading (exact, see :func:`fold_back`).
        map_location: for ``torch.load``.

    Returns:
        ``model`` itself, converted and loaded in place.

    Raises:
        ValueError: the spec does not fit the model, or no prefix makes the keys match.
    """
    ckpt = _load(path_or_checkpoint, map_location)
    state_dict = _state_dict_of(ckpt)
    spec = ckpt.get(specmod.SPEC_KEY)
    target, strip = _resolve_target(model, list(state_dict), spec, prefix)
    if spec:
        specmod.apply_spec(target, specmod.strip_prefix(spec, strip) if strip else spec)
    sd = {k[len(strip) :]: v for k, v in state_dict.items() if k.startswith(strip)}
    target.load_state_dict(sd, strict=strict)
    if fold:
        from lightning_struct.surgery.conversion import fold_back

        fold_back(target)
    return model


def restore_structure(module: nn.Module, checkpoint: Mapping[str, Any]) -> bool:
    """Rebuild ``module``'s converted structure from a checkpoint dict (no weights loaded).

    Meant for ``LightningModule.on_load_checkpoint`` (which Lightning calls *before* loading the
    state dict, also in ``load_from_checkpoint``)::

        def on_load_checkpoint(self, checkpoint):
            restore_structure(self, checkpoint)

    Returns ``True`` when a spec was found and applied (idempotent).
    """
    spec = checkpoint.get(specmod.SPEC_KEY)
    if not spec:
        return False
    specmod.apply_spec(module, spec)
    return True


def save_converted(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write ``{"state_dict", "lightning_struct_conversion"}`` for :func:`load_converted`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), specmod.SPEC_KEY: specmod.get_spec(model)}, path)
    return path
