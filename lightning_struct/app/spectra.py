"""``lightning-struct spectra``: exact per-layer spectra of a checkpoint or a named model.

Usage (Hydra-style ``key=value`` arguments)::

    lightning-struct spectra model=resnet50 input_size=224 out=spectra_resnet50
    lightning-struct spectra ckpt=logs/quickstart/runs/<time>/checkpoints/last.ckpt out=spectra_qs
    lightning-struct spectra model=resnet18 input_size=64 include='layer1.*' stats=norm

Keys:
    ckpt        a checkpoint written by ``lightning-struct train`` (the net is rebuilt from the
                run config stored in it)
    model       a torchvision classification model name (random weights; nothing is downloaded)
    input_size  input side in pixels, or HxW (default: 224 for ``model=``, the run's
                ``data.image_size`` for ``ckpt=``)
    in_channels input channels (default: the first conv's in_channels)
    include / exclude   comma-separated layer-name globs
    stats       ``full`` (all singular values; default) or ``norm`` (spectral norms only, fast path)
    method      full-spectrum method: ``svd`` (default; accurate smallest singular values),
                ``gram`` (~2x faster; values below ~1e-3 sigma_max only to that floor) or ``auto``
    out         output directory (default ``spectra``): ``spectra.csv`` and ``spectra.png``

Writes a CSV of per-layer statistics (input size, sigma_max, sigma_min, condition number, stable
rank, effective rank, reshape bound, seconds) and a PNG of the sorted spectra, and prints a table.
"""

from __future__ import annotations

import csv
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_struct._checks import check_choice, check_unknown
from lightning_struct.ops.spectral import CONV_TYPES, SPECTRUM_STATS, SUPPORTED_TYPES, model_spectra
from lightning_struct.select import InputSizeRecorder, select_layers

_WHERE = "lightning-struct spectra"

KEYS = ("ckpt", "model", "input_size", "in_channels", "include", "exclude", "stats", "method", "out")


def parse_args(argv: Sequence[str]) -> dict[str, str]:
    """``key=value`` pairs; raises ``ValueError`` naming an unknown key or a malformed argument."""
    args: dict[str, str] = {}
    for item in argv:
        key, sep, value = item.partition("=")
        key = key.lstrip("+")
        if not sep:
            raise ValueError(f"argument {item!r} is not key=value; keys: {', '.join(KEYS)}")
        check_unknown([key], KEYS, "key")
        args[key] = value
    if ("ckpt" in args) == ("model" in args):
        raise ValueError("give exactly one of ckpt=PATH or model=NAME (a torchvision model)")
    check_choice(args.get("stats", "full"), "stats", ("full", "norm"))
    check_choice(args.get("method", "svd"), "method", ("svd", "gram", "auto"))
    return args


def parse_size(text: str, key: str = "input_size") -> tuple[int, int]:
    """``"N"`` or ``"HxW"`` (also ``"H,W"``) -> ``(H, W)``; a clear error naming ``key`` otherwise."""
    parts = text.lower().replace(",", "x").split("x")
    try:
        dims = [int(p) for p in parts if p]
    except ValueError as err:
        raise ValueError(f"{key}={text!r}: expected N or HxW") from err
    if len(dims) == 1:
        dims *= 2
    if len(dims) != 2 or min(dims) < 1:
        raise ValueError(f"{key}={text!r}: expected N or HxW")
    return dims[0], dims[1]


def load_model(args: dict[str, str]) -> tuple[nn.Module, tuple[int, int] | None]:
    """The network to inspect, and the input size its run config implies (if any)."""
    if "ckpt" in args:
        from lightning_struct.models import load_classifier

        path = Path(args["ckpt"])
        if not path.is_file():
            raise FileNotFoundError(f"ckpt={str(path)!r} does not exist")
        model = load_classifier(str(path))
        image_size = (model.run_config or {}).get("data", {}).get("image_size")
        return model.net, ((int(image_size), int(image_size)) if image_size else None)
    from lightning_struct.models import torchvision_model

    return torchvision_model(args["model"]), None


def analyse(
    net: nn.Module,
    input_size: tuple[int, int],
    in_channels: int | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    stats: str = "full",
    method: str = "svd",
) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """Per-layer rows (statistics) and singular values of ``net`` at ``input_size``."""
    layers = select_layers(net, SUPPORTED_TYPES, include, exclude, what=_WHERE)
    if not layers:
        raise ValueError("no Conv/Linear layer selected")
    # the network's input channels come from its first conv, selected or not
    first_conv = next((m for m in net.modules() if isinstance(m, CONV_TYPES)), None)
    channels = in_channels or (first_conv.in_channels if first_conv is not None else 3)
    net.eval()
    with torch.no_grad(), InputSizeRecorder(layers) as rec:
        net(torch.zeros(1, channels, *input_size))
    spectra = model_spectra(layers, rec.sizes, stats=stats, method=method)  # type: ignore[arg-type]
    rows: list[dict[str, Any]] = []
    for layer in spectra.values():
        if not layer.finite:
            print(f"{_WHERE}: layer {layer.name!r} has NaN/inf weights; its statistics are NaN", file=sys.stderr)
        rows.append(
            {
                "layer": layer.name,
                "type": layer.kind,
                "weight_shape": "x".join(map(str, layer.weight_shape)),
                "input_size": "x".join(map(str, layer.input_size)) or "-",
                **{k: layer.stats.get(k, math.nan) for k in SPECTRUM_STATS},
                "seconds": layer.seconds,
            }
        )
    values = {name: layer.values for name, layer in spectra.items() if layer.values is not None}
    return rows, values


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("layer", "input_size", "sigma_max", "sigma_min", "condition_number", "stable_rank", "reshape_bound"):
        table.add_column(col, justify="left" if col in ("layer", "input_size") else "right")
    for r in rows:
        table.add_row(
            r["layer"], r["input_size"], *(f"{r[k]:.4g}" for k in ("sigma_max", "sigma_min", "condition_number", "stable_rank", "reshape_bound"))
        )
    Console(width=140).print(table)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        args = parse_args(argv)
        net, implied = load_model(args)
        size = parse_size(args["input_size"]) if "input_size" in args else (implied or (224, 224))
        split = lambda key: [p for p in args[key].split(",") if p] if args.get(key) else None  # noqa: E731
        t0 = time.perf_counter()
        rows, values = analyse(
            net,
            size,
            in_channels=int(args["in_channels"]) if "in_channels" in args else None,
            include=split("include"),
            exclude=split("exclude"),
            stats=args.get("stats", "full"),
            method=args.get("method", "svd"),
        )
    except (ValueError, FileNotFoundError, TypeError) as err:
        print(f"lightning-struct spectra: {err}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - t0
    out = Path(args.get("out", "spectra"))
    source = args.get("ckpt") or args["model"]
    csv_path = write_csv(rows, out / "spectra.csv")
    print_table(rows, f"{source} at {size[0]}x{size[1]} (periodic boundary)")
    print(f"{len(rows)} layers in {elapsed:.2f} s")
    print(f"csv : {csv_path}")
    if values:
        from lightning_struct.viz.spectra import plot_spectra

        png = plot_spectra(values, out / "spectra.png", title=f"{Path(source).name} at {size[0]}x{size[1]}")
        print(f"plot: {png}")
    return 0
