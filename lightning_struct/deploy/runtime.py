"""Running and timing an exported artifact: onnxruntime sessions, ExportedPrograms, TorchScript.

onnx / onnxruntime / onnxscript come with the ``export`` extra (``pip install -e ".[export]"``);
:func:`require_onnx` names it when they are missing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["RUNTIMES", "has_onnx", "load_runner", "ort_session", "require_onnx", "time_call", "time_modules"]

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


RUNTIMES = ("eager", "onnxruntime")
_LAYER_TIMES: dict[tuple[Any, ...], float] = {}


def _layer_key(module: torch.nn.Module, shape: tuple[int, ...], runtime: str) -> tuple[Any, ...]:
    params = tuple((n, tuple(p.shape), p.dtype) for n, p in module.named_parameters())
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    return (runtime, repr(module), params, shape, str(device), torch.get_num_threads())


def _layer_call(module: torch.nn.Module, x: torch.Tensor, runtime: str, workdir: Path, tag: str) -> Callable[[], Any]:
    if runtime == "eager":

        def run_eager() -> Any:
            with torch.inference_mode():
                return module(x)

        return run_eager
    require_onnx("speed checks in onnxruntime")
    path = workdir / f"{tag}.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x.cpu(),), None, dynamo=True, optimize=True).save(str(path))
    sess = ort_session(path)
    name = sess.get_inputs()[0].name
    feed = {name: x.detach().cpu().numpy()}
    return lambda: sess.run(None, feed)


def time_modules(
    modules: dict[str, torch.nn.Module], shape: tuple[int, ...], runtime: str = "eager", *, repeats: int = 15
) -> dict[str, float]:
    """Median seconds of one forward of each module on a random input of ``shape``, in ``runtime``.

    ``"eager"``: PyTorch under ``inference_mode`` on the modules' device; ``"onnxruntime"``: each
    module exported alone (fixed shape) and run in an onnxruntime CPU session. The modules not yet
    timed are timed interleaved (so load drift hits them alike); results are cached per module
    configuration, parameter shapes, input shape, device and thread count.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"time_modules: runtime={runtime!r}; allowed: {', '.join(map(repr, RUNTIMES))}")
    shape = tuple(int(s) for s in shape)
    out: dict[str, float] = {}
    todo: dict[str, Callable[[], Any]] = {}
    with tempfile.TemporaryDirectory(prefix="ls-time-") as tmp:
        for label, m in modules.items():
            key = _layer_key(m, shape, runtime)
            if key in _LAYER_TIMES:
                out[label] = _LAYER_TIMES[key]
                continue
            m = m.eval()
            device = next((p.device for p in m.parameters()), torch.device("cpu"))
            x = torch.randn(shape, device=device if runtime == "eager" else "cpu")
            todo[label] = _layer_call(m, x, runtime, Path(tmp), f"m{len(todo)}")
        if todo:
            for fn in todo.values():
                fn()
                fn()
            times: dict[str, list[float]] = {k: [] for k in todo}
            for _ in range(repeats):
                for k, fn in todo.items():
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    fn()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    times[k].append(time.perf_counter() - t0)
            for k, ts in times.items():
                out[k] = statistics.median(ts)
                _LAYER_TIMES[_layer_key(modules[k], shape, runtime)] = out[k]
    return out
