"""``lightning-struct bench NAME [--quick] [--json PATH]``.

Each benchmark is a module ``lightning_struct.bench.<name>`` exposing
``run(quick: bool = False, device: str = "cpu") -> list[Row]`` and a ``TITLE`` string.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from lightning_struct.bench._harness import Row, emit, environment, format_table, median_time

BENCHMARKS: dict[str, str] = {
    "spectral": "exact conv spectra (LFA) vs numpy FFT (Sedghi) / numpy LFA / explicit SVD",
    "force": "training step of ResNet-50 with vs without ForceRegularization",
    "convert": "ResNet-50 inference, dense vs low-rank",
    "acdc": "ACDC stack vs dense Linear vs torch-dct ACDC",
    "fftconv": "FFT convolution vs F.conv2d vs fft-conv-pytorch",
    "deploy": "dense vs converted after export: eager, torch.compile, onnxruntime",
}

__all__ = ["BENCHMARKS", "Row", "emit", "environment", "format_table", "main", "median_time"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lightning-struct bench",
        description="Benchmarks; each compares against its baseline in the same process and prints ratios.",
    )
    parser.add_argument("name", help="; ".join(f"{k}: {v}" for k, v in BENCHMARKS.items()))
    parser.add_argument("--quick", action="store_true", help="a small subset that finishes in about a minute")
    parser.add_argument("--json", metavar="PATH", default=None, help="write the rows as JSON to PATH")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    args = parser.parse_args(argv)
    if args.name not in BENCHMARKS:
        print(f"unknown benchmark {args.name!r}; available: {', '.join(sorted(BENCHMARKS))}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"lightning_struct.bench.{args.name}")
    print(f"# {module.TITLE}  ({environment()})", flush=True)
    rows = module.run(quick=args.quick, device=args.device)
    emit(rows, module.TITLE, args.json)
    return 0
