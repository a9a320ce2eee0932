"""Running and timing an exported artifact: onnxruntime sessions, ExportedPrograms, TorchScript.

onnx / onnxruntime / onnxscript come with the ``export`` extra (``pip install -e ".[export]"``);
:func:`require_onnx` names it when they are missing.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["has_onnx", "load_runner", "ort_session", "require_onnx", "time_call"]

_ONNX_MODULES = ("onnx", "onnxruntime", "onnxscript")


def has_onnx() -> bool:
    """Whether onnx, onnxruntime and onnxscript are importable."""
    return all(importlib.util.find_spec(m) is not None for m in _ONNX_MODULES)


def require_onnx(what: str) -> None:
    missing = [m for m in _ONNX_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(
            f"{what} needs {', '.join(missing)}: install the export extra, pip install -e \".[export]\" "
            "(or pip install onnx onnxruntime onnxscript)"
        )


def ort_session(path: str | os.PathLike[str], threads: int | None = None) -> Any:
    """An onnxruntime CPU session (``threads``: intra-op threads, default: torch's thread count)."""
    require_onnx("running an ONNX model")
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads or torch.get_num_threads())
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def load_runner(path: str | os.PathLike[str], fmt: str, threads: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function ``x -> y`` (CPU tensors) running the artifact at ``path`` in its own runtime."""
    path = Path(path)
    if fmt == "onnx":
        sess = ort_session(path, threads)
        name = sess.get_inputs()[0].name

        def run_onnx(x: torch.Tensor) -> torch.Tensor:
            out = sess.run(None, {name: np.ascontiguousarray(x.detach().cpu().numpy())})[0]
            return torch.from_numpy(np.asarray(out))

        return run_onnx
    if fmt == "exported_program":
        module = torch.export.load(str(path)).module()

        def run_ep(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return module(x)

        return run_ep
    if fmt == "torchscript":
        script = torch.jit.load(str(path), map_location="cpu")
        script.eval()

        def run_ts(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return script(x)

        return run_ts
    raise ValueError(f"load_runner: unknown format {fmt!r}")


def time_call(fn: Callable[[], Any], *, repeats: int = 10, warmup: int = 2, budget_s: float = 5.0) -> float:
    """Median seconds per call of ``fn`` (after ``warmup`` calls; stops early after ``budget_s``)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s and len(times) >= 3:
            break
    return statistics.median(times)
