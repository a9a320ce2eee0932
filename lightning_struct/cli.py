"""The ``lightning-struct`` console command.

Subcommands::

    lightning-struct train   [hydra overrides ...]   # Hydra app: -m, --cfg job, --info all work
    lightning-struct spectra [key=value ...]         # per-layer spectra of a checkpoint / named model
    lightning-struct spectra --compare A.ckpt B.ckpt # two checkpoints side by side (CSV, PNG, HTML)
    lightning-struct export  ckpt=... [format=onnx] [key=value ...]   # deploy a (converted) checkpoint
    lightning-struct bench NAME [--quick] [--json PATH]
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

# subcommand -> (module, function taking argv, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("lightning_struct.app.train", "main", "train a model from Hydra configs/recipes"),
    "spectra": ("lightning_struct.app.spectra", "main", "exact conv spectra of a checkpoint or model"),
    "export": ("lightning_struct.app.export", "main", "a checkpoint as ONNX / ExportedProgram / TorchScript, checked"),
    "bench": ("lightning_struct.bench", "main", "benchmarks with ratios against their baselines"),
}


def _usage() -> str:
    lines = ["usage: lightning-struct {" + ",".join(SUBCOMMANDS) + "} [args ...]", "", "subcommands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, _, help_) in SUBCOMMANDS.items()]
    lines += ["", "Run `lightning-struct SUBCOMMAND --help` for the options of one subcommand."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if args[0] in ("-V", "--version"):
        from lightning_struct import __version__

        print(f"lightning-struct {__version__}")
        return 0
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"lightning-struct: unknown subcommand {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name, _ = SUBCOMMANDS[name]
    func: Callable[[list[str]], int | None] = getattr(importlib.import_module(module_name), func_name)
    code = func(rest)
    return int(code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
