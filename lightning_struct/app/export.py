"""``lightning-struct export``: a trained (converted) checkpoint as ONNX / ExportedProgram / TorchScript.

Usage (``key=value`` arguments)::

    lightning-struct export ckpt=logs/quickstart/runs/<time>/checkpoints/last.ckpt
    lightning-struct export ckpt=PATH format=exported_program input_size=32 out=net.pt2
    lightning-struct export ckpt=PATH evaluate=test          # test accuracy, eager vs the artifact

Keys:
    ckpt        a checkpoint written by ``lightning-struct train`` (converted ones included: the
                structure is rebuilt from the spec stored in it)
    format      ``onnx`` (default), ``exported_program`` or ``torchscript``
    input_size  input side in pixels, or HxW (default: the run's ``data.image_size``)
    batch       batch size of the example input (default 1; the exported batch is dynamic)
    fold        comma-separated folds before exporting: ``fft``, ``batchnorm``, ``lowrank``
                (default ``fft,batchnorm``; ``none`` for nothing)
    rtol        largest accepted relative disagreement with the eager model (default 1e-4)
    out         the file to write (default: next to the checkpoint, ``<ckpt stem>.onnx|.pt2|.pt``)
    evaluate    ``test`` or ``val``: run the run's datamodule split through the eager model and the
                exported artifact (in its runtime) and print both accuracies

The network (``model.net``) is exported: it takes the inputs the run's data module produces
(already normalised) and returns logits.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_struct._checks import check_choice, check_unknown
from lightning_struct.app.spectra import parse_size

_WHERE = "lightning-struct export"
KEYS = ("ckpt", "format", "input_size", "batch", "fold", "rtol", "out", "evaluate")
SUFFIX = {"onnx": ".onnx", "exported_program": ".pt2", "torchscript": ".pt"}


def parse_args(argv: Sequence[str]) -> dict[str, str]:
    args: dict[str, str] = {}
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"argument {item!r} is not key=value; keys: {', '.join(KEYS)}")
        check_unknown([key], KEYS, "key")
        args[key] = value
    if "ckpt" not in args:
        raise ValueError("give ckpt=PATH (a checkpoint written by `lightning-struct train`)")
    check_choice(args.get("format", "onnx"), "format", tuple(SUFFIX))
    if "evaluate" in args:
        check_choice(args["evaluate"], "evaluate", ("test", "val"))
    return args


def _datamodule(run_config: dict[str, Any]) -> Any:
    from hydra.utils import instantiate

    data = run_config.get("data")
    if not data:
        raise ValueError("the checkpoint's run config has no 'data' section; evaluate= needs it")
    return instantiate(data)


def accuracy(fn: Any, loader: Any) -> tuple[float, int]:
    """Top-1 accuracy of ``fn`` (``x -> logits``) over ``loader``, and the number of samples."""
    correct = total = 0
    with torch.no_grad():
        for batch in loader:
            x, y = batch[0], batch[1]
            pred = fn(x).argmax(-1)
            correct += int((pred == y).sum())
            total += int(y.numel())
    return (correct / total if total else float("nan")), total


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        args = parse_args(argv)
        from lightning_struct.deploy import export
        from lightning_struct.deploy.runtime import load_runner
        from lightning_struct.models import load_classifier

        ckpt = Path(args["ckpt"])
        if not ckpt.is_file():
            raise FileNotFoundError(f"ckpt={str(ckpt)!r} does not exist")
        fmt = args.get("format", "onnx")
        model = load_classifier(str(ckpt)).eval()
        net: nn.Module = model.net
        run_config = model.run_config or {}
        size = args.get("input_size") or str(run_config.get("data", {}).get("image_size", ""))
        if not size:
            raise ValueError("the checkpoint does not say its input size: give input_size=N or HxW")
        first = next((m for m in net.modules() if isinstance(m, nn.Conv2d)), None)
        channels = first.in_channels if first is not None else 3
        batch = int(args.get("batch", 1))
        example = torch.randn(batch, channels, *parse_size(size), generator=torch.Generator().manual_seed(0))
        fold_arg = args.get("fold", "fft,batchnorm")
        fold: Any = () if fold_arg in ("none", "") else fold_arg
        out = Path(args.get("out") or ckpt.with_suffix(SUFFIX[fmt]))
        result = export(net, example, out, fmt, fold=fold, rtol=float(args.get("rtol", 1e-4)))
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as err:
        print(f"{_WHERE}: error: {err}", file=sys.stderr)
        return 2
    print(result.summary())
    if "evaluate" in args:
        split = args["evaluate"]
        dm = _datamodule(run_config)
        dm.prepare_data()
        dm.setup("test" if split == "test" else "fit")
        loader = dm.test_dataloader() if split == "test" else dm.val_dataloader()
        eager, n = accuracy(net, loader)
        exported, _ = accuracy(load_runner(result.path, fmt), loader)
        print(f"{split} accuracy on {n} samples: eager {eager:.4f}, {fmt} {exported:.4f}")
    return 0
