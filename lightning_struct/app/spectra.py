"""``lightning-struct spectra``: exact per-layer spectra of a checkpoint or a named model, or two
checkpoints compared.

Usage (Hydra-style ``key=value`` arguments)::

    lightning-struct spectra model=resnet50 input_size=224 out=spectra_resnet50
    lightning-struct spectra ckpt=logs/quickstart/runs/<time>/checkpoints/last.ckpt out=spectra_qs
    lightning-struct spectra model=resnet18 input_size=64 include='layer1.*' stats=norm
    lightning-struct spectra --compare A.ckpt B.ckpt [labels=NAME_A,NAME_B] [key=value ...]

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
rank, effective rank, reshape bound, the ESD power-law alpha / alpha_weighted / log_spectral_norm
with stats=full, seconds) and a PNG of the sorted spectra, and prints a table.

Comparison: ``--compare A B`` takes two checkpoints written by ``lightning-struct train`` (e.g. one
recipe with and without the force regularizer, or ``checkpoints/epoch_001.ckpt`` vs ``last.ckpt``
of one run) instead of ``ckpt=``/``model=``; both nets are analysed at one input size
(``input_size=``, else the runs' ``data.image_size``, which must then agree) with the same
include/exclude/stats/method. Extra key:
    labels      ``NAME_A,NAME_B`` for the legend and the report (default: the shortest parts of
                the two paths that tell them apart)
``out`` defaults to ``spectra_compare`` and receives ``compare.csv`` (one row per layer: both nets'
sigma_max, sigma_min, condition_number, stable_rank, effective_rank side by side as ``<stat>_A`` /
``<stat>_B``, and ``sigma_max_B_over_A``, ``stable_rank_B_over_A``), ``compare.png`` (small
multiples: one panel per layer, per stage beyond 64 layers; A blue, B orange; zeros counted, not
drawn) and ``compare.html`` (the figure, the table, the command and the two sources in one offline
file). Layers present in only one net are kept (column ``present``) and listed. Prints the layers
whose sigma_max or stable rank changed most.
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
#: keys of ``--compare A B`` (the two checkpoints replace ``ckpt=`` / ``model=``)
COMPARE_KEYS = ("labels", "input_size", "in_channels", "include", "exclude", "stats", "method", "out")
#: statistics written side by side by ``--compare``
COMPARE_STATS = ("sigma_max", "sigma_min", "condition_number", "stable_rank", "effective_rank")


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
        return model.net, _run_image_size(model.run_config)
    from lightning_struct.models import torchvision_model

    return torchvision_model(args["model"]), None


def _run_image_size(run_config: dict[str, Any] | None) -> tuple[int, int] | None:
    """The ``data.image_size`` of a run config as ``(H, W)``, if it has one."""
    image_size = (run_config or {}).get("data", {}).get("image_size")
    return (int(image_size), int(image_size)) if image_size else None


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
    from lightning_struct.callbacks.spectral import ESD_KEYS, layer_esd

    modules = dict(layers)
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
                **(layer_esd(modules.get(layer.name), layer.values) if layer.values is not None else dict.fromkeys(ESD_KEYS, math.nan)),
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
    if "--compare" in argv:
        return compare_main(argv)
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


# ----------------------------------------------------------------------------------------------
# --compare A B
# ----------------------------------------------------------------------------------------------
def parse_compare_args(argv: Sequence[str]) -> tuple[tuple[str, str], dict[str, str]]:
    """``--compare A B [key=value ...]`` -> ``((A, B), args)``; ``ValueError`` naming what is wrong.

    The two tokens after ``--compare`` are the checkpoints (paths may contain ``=``, e.g.
    ``epoch=000-step=10.ckpt``); every other token is ``key=value`` with a key of ``COMPARE_KEYS``.
    """
    argv = list(argv)
    usage = "usage: --compare A.ckpt B.ckpt [key=value ...]"
    if argv.count("--compare") > 1:
        raise ValueError(f"--compare given {argv.count('--compare')} times; {usage}")
    i = argv.index("--compare")
    paths = argv[i + 1 : i + 3]

    def is_key_value(token: str) -> bool:
        key = token.partition("=")[0].lstrip("+")
        return "=" in token and key in (*COMPARE_KEYS, *KEYS) and not Path(token).exists()

    given = [p for p in paths if not p.startswith("--") and not is_key_value(p)]
    if len(given) < 2 or given != paths:
        shown = f": {given[0]!r}" if given else ""
        raise ValueError(f"--compare takes two checkpoint paths A B, got {len(given)}{shown}; {usage}")
    args: dict[str, str] = {}
    for item in argv[:i] + argv[i + 3 :]:
        key, sep, value = item.partition("=")
        key = key.lstrip("+")
        if not sep or key not in COMPARE_KEYS:
            if Path(item).is_file() or item.endswith((".ckpt", ".pt", ".pth")):
                raise ValueError(
                    f"--compare takes exactly two checkpoints; {item!r} would be a third (did a glob match "
                    "several files? quote it or name one file)"
                )
            if key in ("ckpt", "model"):
                raise ValueError(f"{key}= cannot be combined with --compare A B (the two checkpoints replace it)")
        if not sep:
            raise ValueError(f"argument {item!r} is not key=value; keys with --compare: {', '.join(COMPARE_KEYS)}")
        check_unknown([key], COMPARE_KEYS, "key (with --compare)")
        args[key] = value
    check_choice(args.get("stats", "full"), "stats", ("full", "norm"))
    check_choice(args.get("method", "svd"), "method", ("svd", "gram", "auto"))
    if "labels" in args:
        labels = [p.strip() for p in args["labels"].split(",")]
        if len(labels) != 2 or not all(labels) or labels[0] == labels[1]:
            raise ValueError(f"labels={args['labels']!r}: expected two different names NAME_A,NAME_B")
    return (paths[0], paths[1]), args


def default_labels(a: str, b: str, width: int = 40) -> tuple[str, str]:
    """Short names of two checkpoint paths: what tells them apart.

    The common leading directories go, then the parts equal at the same place from the end
    (``runs/with_force/checkpoints/last.ckpt`` vs ``runs/no_force/checkpoints/last.ckpt`` ->
    ``with_force`` / ``no_force``; ``checkpoints/epoch_001.ckpt`` vs ``checkpoints/last.ckpt`` ->
    ``epoch_001`` / ``last``). The same path twice gives ``A`` / ``B``.
    """
    import os

    pa, pb = (list(Path(os.path.abspath(p)).with_suffix("").parts) for p in (a, b))
    while len(pa) > 1 and len(pb) > 1 and pa[0] == pb[0]:
        pa, pb = pa[1:], pb[1:]
    n = min(len(pa), len(pb))
    keep_a = pa[: len(pa) - n] + [x for x, y in zip(pa[-n:], pb[-n:]) if x != y]
    keep_b = pb[: len(pb) - n] + [y for x, y in zip(pa[-n:], pb[-n:]) if x != y]
    la, lb = ("/".join(k) or "/".join(p) for k, p in ((keep_a, pa), (keep_b, pb)))
    la, lb = (x if len(x) <= width else "…" + x[-(width - 1) :] for x in (la, lb))
    return ("A", "B") if la == lb else (la, lb)


def load_checkpoint_net(path: str, side: str) -> tuple[nn.Module, tuple[int, int] | None, str]:
    """The net of a ``lightning-struct train`` checkpoint, its run's image size, and a description
    (path, epoch, step, task) for the report; errors name the side (``A`` / ``B``) and the path."""
    from lightning_struct.models import load_classifier

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--compare {side}: {path!r} does not exist" + (" (a directory)" if p.is_dir() else ""))
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
            raise ValueError("no 'state_dict' (a plain state dict or tensor file is not enough: the net is rebuilt from the run config)")
        model = load_classifier(ckpt)
    except Exception as err:  # unpickling, Hydra instantiation, strict loading: one clear message
        raise ValueError(f"--compare {side}: {path!r} is not a readable `lightning-struct train` checkpoint: {err}") from err
    run = ckpt.get("run_config") or {}
    facts = [f"{k} {ckpt[k]}" for k in ("epoch", "global_step") if k in ckpt]
    if run.get("task_name"):
        facts.append(f"task {run['task_name']}")
    about = f"{p.resolve()}" + (f" ({', '.join(facts)})" if facts else "")
    return model.net, _run_image_size(run), about


def _ratio(b: Any, a: Any) -> float:
    """``b / a`` of two statistics; NaN where either is missing or undefined, inf for ``b > 0 = a``."""
    try:
        a, b = float(a), float(b)
    except (TypeError, ValueError):
        return math.nan
    if not (math.isfinite(a) and math.isfinite(b)):
        return math.nan
    if a == 0:
        return math.inf if b > 0 else math.nan
    return b / a


def compare_rows(rows_a: list[dict[str, Any]], rows_b: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per layer of either net (A's order, B's extra layers after their predecessor).

    Columns: ``layer``, ``present`` (``both`` / ``A only`` / ``B only``), ``type_*``,
    ``weight_shape_*``, ``input_size_*``, each statistic of ``COMPARE_STATS`` as ``<stat>_A`` and
    ``<stat>_B``, then ``sigma_max_B_over_A`` and ``stable_rank_B_over_A``. The absent side's
    cells are empty.
    """
    by_a = {r["layer"]: r for r in rows_a}
    by_b = {r["layer"]: r for r in rows_b}
    order = [r["layer"] for r in rows_a]
    prev = None
    for r in rows_b:
        name = r["layer"]
        if name not in by_a:
            order.insert(order.index(prev) + 1 if prev is not None else 0, name)
        prev = name
    out: list[dict[str, Any]] = []
    for name in order:
        ra, rb = by_a.get(name), by_b.get(name)
        row: dict[str, Any] = {"layer": name, "present": "both" if ra and rb else "A only" if ra else "B only"}
        for col in ("type", "weight_shape", "input_size"):
            row[f"{col}_A"], row[f"{col}_B"] = (ra or {}).get(col, ""), (rb or {}).get(col, "")
        for k in COMPARE_STATS:
            row[f"{k}_A"], row[f"{k}_B"] = (ra or {}).get(k, ""), (rb or {}).get(k, "")
        for k in ("sigma_max", "stable_rank"):
            row[f"{k}_B_over_A"] = _ratio(row[f"{k}_B"], row[f"{k}_A"]) if ra and rb else ""
        out.append(row)
    return out


def print_changes(rows: list[dict[str, Any]], labels: tuple[str, str], title: str, top: int = 10) -> None:
    """A rich table of the ``top`` layers whose sigma_max or stable rank changed most (|log B/A|)."""
    from rich.console import Console
    from rich.table import Table

    def change(r: dict[str, Any]) -> float:
        ratios = [r[f"{k}_B_over_A"] for k in ("sigma_max", "stable_rank")]
        logs = [abs(math.log(v)) if 0 < v < math.inf else math.inf for v in ratios if isinstance(v, float) and not math.isnan(v)]
        return max(logs, default=-1.0)

    both = sorted((r for r in rows if r["present"] == "both"), key=change, reverse=True)[:top]
    table = Table(title=title, caption=f"A = {labels[0]}, B = {labels[1]}; largest |log(B/A)| of sigma_max or stable rank first")
    for col in ("layer", "sigma_max A", "sigma_max B", "B/A", "stable_rank A", "stable_rank B", "B/A "):
        table.add_column(col, justify="left" if col == "layer" else "right")
    fmt = lambda v: f"{v:.4g}" if isinstance(v, (int, float)) else str(v)  # noqa: E731
    for r in both:
        table.add_row(
            r["layer"], *(fmt(r[k]) for k in ("sigma_max_A", "sigma_max_B", "sigma_max_B_over_A", "stable_rank_A", "stable_rank_B", "stable_rank_B_over_A"))
        )
    Console(width=140).print(table)


def compare_main(argv: Sequence[str]) -> int:
    """``lightning-struct spectra --compare A B [key=value ...]``: returns the exit code (2: bad input)."""
    import shlex

    try:
        (path_a, path_b), args = parse_compare_args(argv)
        labels = tuple(p.strip() for p in args["labels"].split(",")) if "labels" in args else default_labels(path_a, path_b)
        size = parse_size(args["input_size"]) if "input_size" in args else None
        nets = [load_checkpoint_net(p, side) for p, side in ((path_a, "A"), (path_b, "B"))]
        if size is None:
            implied = {n[1] for n in nets if n[1] is not None}
            if len(implied) > 1:
                (ha, wa), (hb, wb) = nets[0][1], nets[1][1]  # type: ignore[misc]
                raise ValueError(
                    f"A was trained at {ha}x{wa} and B at {hb}x{wb} (data.image_size): give input_size= to compare "
                    "both at one size"
                )
            size = implied.pop() if implied else (224, 224)
        split = lambda key: [p for p in args[key].split(",") if p] if args.get(key) else None  # noqa: E731
        t0 = time.perf_counter()
        results = []
        for (net, _, _), side, label in zip(nets, "AB", labels):
            try:
                results.append(
                    analyse(
                        net, size, in_channels=int(args["in_channels"]) if "in_channels" in args else None,
                        include=split("include"), exclude=split("exclude"), stats=args.get("stats", "full"),
                        method=args.get("method", "svd"),
                    )
                )  # fmt: skip
            except ValueError as err:
                text = str(err).removeprefix(f"{_WHERE}: ")
                raise ValueError(f"{side}{f' ({label})' if label != side else ''}: {text}") from err
    except (ValueError, FileNotFoundError, TypeError) as err:
        print(f"lightning-struct spectra: {err}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - t0
    (rows_a, values_a), (rows_b, values_b) = results
    rows = compare_rows(rows_a, rows_b)
    out = Path(args.get("out", "spectra_compare"))
    hw = f"{size[0]}x{size[1]}"
    csv_path = write_csv(rows, out / "compare.csv")
    only = {side: [r["layer"] for r in rows if r["present"] == f"{side} only"] for side in "AB"}
    notes = [f"{len(rows) - len(only['A']) - len(only['B'])} layers in both nets, at input {hw} (periodic boundary)."]
    notes += [f"only in {side} ({labels[i]}): {', '.join(only[side])}" for i, side in enumerate("AB") if only[side]]
    print_changes(rows, labels, f"{labels[0]} vs {labels[1]} at {hw} (periodic boundary)")
    print(f"{len(rows_a)} layers of A and {len(rows_b)} of B analysed in {elapsed:.2f} s")
    for note in notes[1:]:
        print(note)
    print(f"csv : {csv_path}")
    png = None
    if values_a or values_b:
        from lightning_struct.viz.compare import ZERO_REL, plot_compare

        caption = (
            f"sorted singular values of each layer's exact conv operator (periodic boundary, input {hw}): "
            f"{labels[0]} vs {labels[1]}; zeros (<= {ZERO_REL:g} sigma_max) counted, not drawn"
        )
        png = plot_compare(
            values_a, values_b, out / "compare.png", labels=labels, order=[r["layer"] for r in rows],  # type: ignore[arg-type]
            title=f"A = {labels[0]} vs B = {labels[1]} at {hw}", caption=caption,
        )  # fmt: skip
        print(f"plot: {png}")
    else:
        notes.append("no figure: stats=norm computes the spectral norms only.")
    from lightning_struct.viz.compare import write_html

    page = write_html(
        out / "compare.html", title=f"spectra: {labels[0]} vs {labels[1]} at {hw}",
        command=shlex.join(["lightning-struct", "spectra", *argv]),
        sources=[(f"A = {labels[0]}", nets[0][2]), (f"B = {labels[1]}", nets[1][2])], rows=rows, image=png, notes=notes,
    )  # fmt: skip
    print(f"html: {page}")
    return 0
