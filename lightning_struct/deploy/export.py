"""``export()``: write a (converted) network as ONNX, an ExportedProgram or TorchScript, checked.

Steps, on a deep copy of the model in eval mode (the caller's model is never changed):

1. fold (``fold=``): ``"fft"`` FFT convolutions to the ``Conv2d`` they are, ``"batchnorm"`` BN into
   the preceding conv, ``"lowrank"`` every low-rank / ReLU-free ACDC layer back to dense,
   ``"slower"`` only those that time slower than dense in the target runtime;
2. trace with every input dimension marked ``Dim.AUTO``: the batch and spatial (or sequence)
   sizes stay dynamic wherever the network allows it, the rest is specialised by the tracer;
3. for ONNX with ACDC layers and ``acdc_dct="auto"``: export once with FFT DCTs (the ONNX ``DFT``
   op) and once with dense DCT matrices, time both in onnxruntime, keep the faster;
4. run the artifact in its own runtime (onnxruntime for ONNX, ``torch.export.load`` /
   ``torch.jit.load``) on the example input and on fresh random inputs of other batch and spatial
   sizes, and compare with the eager model: the file is moved into place only when every output
   agrees within ``rtol`` (relative to the output's largest magnitude); otherwise
   :class:`ExportMismatchError` says where it disagreed and nothing is written.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_struct._checks import check_choice
from lightning_struct.deploy import fold as foldmod
from lightning_struct.deploy.runtime import load_runner, require_onnx, time_call
from lightning_struct.nn.acdc import ACDCStack

__all__ = ["FOLDS", "FORMATS", "ExportMismatchError", "ExportResult", "export", "fresh_shapes"]

FORMATS = ("onnx", "exported_program", "torchscript")
FOLDS = ("fft", "batchnorm", "lowrank", "slower")
DEFAULT_FOLD = ("fft", "batchnorm")
SUFFIX = {"onnx": ".onnx", "exported_program": ".pt2", "torchscript": ".pt"}


class ExportMismatchError(ValueError):
    """The exported artifact does not compute what the eager model computes (nothing was written)."""


@dataclass
class ExportResult:
    """What :func:`export` wrote and how it was checked."""

    path: Path
    format: str
    dynamic_dims: list[int]
    checks: list[tuple[tuple[int, ...], float]]  # (input shape, max relative error)
    rtol: float
    folded: dict[str, list[str]] = field(default_factory=dict)
    acdc_dct: str | None = None
    acdc_dct_timings: dict[str, float] = field(default_factory=dict)

    @property
    def max_rel_error(self) -> float:
        return max((e for _, e in self.checks), default=0.0)

    def summary(self) -> str:
        lines = [f"wrote {self.format} to {self.path}"]
        dyn = ", ".join(map(str, self.dynamic_dims)) or "none"
        lines.append(f"dynamic input dims: {dyn}")
        for name, items in self.folded.items():
            if items:
                lines.append(f"folded {name}: {len(items)} ({', '.join(items[:4])}{', ...' if len(items) > 4 else ''})")
        if self.acdc_dct:
            times = ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in self.acdc_dct_timings.items())
            lines.append(f"ACDC DCTs as {self.acdc_dct}" + (f" (onnxruntime: {times})" if times else ""))
        checks = "; ".join(f"{'x'.join(map(str, s))}: {e:.1e}" for s, e in self.checks)
        lines.append(f"checked against eager (max rel. error <= {self.rtol:g}): {checks}")
        return "\n".join(lines)


def _as_folds(fold: bool | str | Sequence[str]) -> tuple[str, ...]:
    if fold is True:
        return DEFAULT_FOLD
    if fold is False or fold is None:
        return ()
    items = [fold] if isinstance(fold, str) else list(fold)
    items = [s.strip() for item in items for s in str(item).split(",") if s.strip()]
    for item in items:
        check_choice(item, "fold", FOLDS, "export")
    return tuple(items)


def fresh_shapes(shape: Sequence[int], dynamic: Sequence[int]) -> list[tuple[int, ...]]:
    """Input shapes that differ from ``shape`` in every dynamic dim (batch: +2; others: +3 and -1)."""
    out: list[tuple[int, ...]] = []
    for delta_batch, delta_other in ((2, 3), (1, -1)):
        s = list(shape)
        for d in dynamic:
            s[d] = max(1, s[d] + (delta_batch if d == 0 else delta_other))
        if tuple(s) != tuple(shape) and tuple(s) not in out:
            out.append(tuple(s))
    return out


@contextlib.contextmanager
def _quiet() -> Iterator[io.StringIO]:
    """Silence the exporters' progress lines and tracer warnings (shown again on failure)."""
    buf = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
        warnings.simplefilter("ignore")
        yield buf


def _dynamic_spec(x: Tensor) -> tuple[dict[int, Any], ...]:
    return ({i: torch.export.Dim.AUTO for i in range(x.ndim)},)


def _ep_dynamic_dims(ep: Any) -> list[int]:
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in ep.graph_signature.user_inputs:
            val = node.meta.get("val")
            if val is not None:
                return [i for i, s in enumerate(val.shape) if not isinstance(s, int)]
    return []


def _onnx_dynamic_dims(path: Path) -> list[int]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return [i for i, d in enumerate(dims) if d.HasField("dim_param")]


def _write(model: nn.Module, x: Tensor, path: Path, fmt: str, opset: int | None) -> list[int]:
    """Write ``fmt`` to ``path``; returns the input dims that stayed dynamic."""
    with _quiet() as buf:
        try:
            if fmt == "exported_program":
                ep = torch.export.export(model, (x,), dynamic_shapes=_dynamic_spec(x), strict=False)
                torch.export.save(ep, str(path))
                return _ep_dynamic_dims(ep)
            if fmt == "onnx":
                kwargs: dict[str, Any] = {"dynamo": True, "dynamic_shapes": _dynamic_spec(x), "optimize": True}
                if opset is not None:
                    kwargs["opset_version"] = opset
                prog = torch.onnx.export(model, (x,), None, **kwargs)
                prog.save(str(path))
                return _onnx_dynamic_dims(path)
            traced = torch.jit.trace(model, (x,), check_trace=False)
            traced.save(str(path))
            return list(range(x.ndim))  # a trace replays its ops: the check tells which sizes it takes
        except Exception as err:
            log = buf.getvalue().strip().splitlines()[-5:]
            raise RuntimeError(
                f"export: torch could not export the model as {fmt}: {type(err).__name__}: {str(err)[:600]}"
                + ("\n" + "\n".join(log) if log else "")
            ) from err


def _rel_error(y: Tensor, ref: Tensor) -> float:
    if y.shape != ref.shape:
        return float("inf")
    scale = ref.abs().max().clamp_min(1e-12)
    return float((y.to(ref.dtype) - ref).abs().max() / scale)


def _accepts(model: nn.Module, x: Tensor, dim: int) -> bool:
    """Whether the eager model runs on ``x`` with dimension ``dim`` made larger (a size it really takes)."""
    shape = list(x.shape)
    shape[dim] += 2 if dim == 0 else 3
    try:
        with torch.no_grad():
            model(torch.zeros(shape, dtype=x.dtype))
    except Exception:  # noqa: BLE001 - a size the network cannot take is simply not varied
        return False
    return True


def _check(
    model: nn.Module, path: Path, fmt: str, x: Tensor, dynamic: list[int], rtol: float, seed: int
) -> tuple[list[tuple[tuple[int, ...], float]], list[int]]:
    runner = load_runner(path, fmt)
    gen = torch.Generator().manual_seed(seed)
    varied = [d for d in dynamic if _accepts(model, x, d)]
    inputs = [x] + [torch.randn(s, generator=gen, dtype=x.dtype) * x.std().clamp_min(1e-3) + x.mean()
                    for s in fresh_shapes(x.shape, varied)]
    checks: list[tuple[tuple[int, ...], float]] = []
    for inp in inputs:
        with torch.no_grad():
            try:
                ref = model(inp)
            except Exception:  # noqa: BLE001 - the eager model itself refuses this size: not a check
                continue
        try:
            with _quiet():
                y = runner(inp)
        except Exception as err:
            raise ExportMismatchError(
                f"export: the {fmt} artifact fails on input {tuple(inp.shape)} that the eager model accepts "
                f"({type(err).__name__}: {str(err)[:300]}); nothing was written"
                + ("; TorchScript traces are fixed-shape: use format=exported_program or onnx" if fmt == "torchscript" else "")
            ) from err
        err_ = _rel_error(y, ref)
        checks.append((tuple(inp.shape), err_))
        if not err_ <= rtol:
            hint = (
                "; TorchScript traces are fixed-shape for FFT layers: keep fold=fft, or use format=exported_program/onnx"
                if fmt == "torchscript" else ""
            )
            raise ExportMismatchError(
                f"export: the {fmt} artifact disagrees with the eager model on input {tuple(inp.shape)}: "
                f"max relative error {err_:.3g} > rtol={rtol:g}; nothing was written{hint}"
            )
    return checks, varied


def _set_acdc_dct(model: nn.Module, how: str) -> None:
    for m in model.modules():
        if isinstance(m, ACDCStack):
            m.export_dct = how


def export(
    model: nn.Module,
    example_input: Tensor,
    path: str | os.PathLike[str],
    format: str = "onnx",
    *,
    fold: bool | str | Sequence[str] = DEFAULT_FOLD,
    acdc_dct: str = "auto",
    rtol: float = 1e-4,
    opset: int | None = None,
    seed: int = 0,
) -> ExportResult:
    """Export ``model`` (any ``nn.Module``, converted or not) and check the artifact against it.

    Args:
        model: the network (e.g. ``load_classifier(ckpt).net``, or a LightningModule: its
            ``forward`` is exported).
        example_input: one input batch (CPU); its batch and spatial sizes become dynamic where
            the network allows it.
        path: the file to write (``.onnx`` / ``.pt2`` / ``.pt`` by convention).
        format: ``"onnx"`` (torch's dynamo exporter, run in onnxruntime for the check),
            ``"exported_program"`` (``torch.export.save``) or ``"torchscript"`` (``jit.trace``).
        fold: what to fold before exporting (see :mod:`.fold`): any of ``"fft"``, ``"batchnorm"``,
            ``"lowrank"`` (every converted layer that has a dense form), ``"slower"`` (only those
            that time slower than their dense form in the target runtime: onnxruntime for ONNX,
            eager otherwise); ``True`` = ``("fft", "batchnorm")`` (the default), ``False`` = nothing.
        acdc_dct: ``"fft"``, ``"matmul"`` or ``"auto"`` (ONNX: the faster of the two in onnxruntime;
            other formats: ``"fft"``).
        rtol: largest accepted ``max|y - y_eager| / max|y_eager|`` on every checked input.
        opset: ONNX opset (default: the exporter's).
        seed: seed of the fresh check inputs.

    Raises:
        ExportMismatchError: the artifact disagrees with the eager model (nothing is written).
        RuntimeError: torch could not trace/export the model (the exporter's message is included).
    """
    check_choice(format, "format", FORMATS, "export")
    check_choice(acdc_dct, "acdc_dct", ("auto", "fft", "matmul"), "export")
    folds = _as_folds(fold)
    if not isinstance(example_input, Tensor):
        raise TypeError(f"export: example_input must be a tensor, got {type(example_input).__name__}")
    if format == "onnx":
        require_onnx("export(format='onnx')")
    path = Path(path)
    work = copy.deepcopy(model).cpu().eval()
    x = example_input.detach().cpu()
    # tracers specialise a size-1 dimension to 1; trace a batch of two so the batch stays dynamic
    x_trace = x.repeat(2, *([1] * (x.ndim - 1))) if x.ndim and x.shape[0] == 1 else x
    folded: dict[str, list[str]] = {}
    if "fft" in folds:
        folded["fft"] = foldmod.fold_fft(work)
    if "lowrank" in folds:
        names = [n for n, m in work.named_modules() if isinstance(m, foldmod.DENSE_FOLDABLE)]
        folded["lowrank"] = foldmod.fold_dense(work, names)
    elif "slower" in folds:
        runtime = "onnxruntime" if format == "onnx" else "eager"
        folded["slower"] = foldmod.fold_slower(work, x, runtime)
    if "batchnorm" in folds:
        folded["batchnorm"] = foldmod.fold_batchnorm(work)
    has_acdc = any(isinstance(m, ACDCStack) for m in work.modules())
    choice = None if not has_acdc else ("fft" if acdc_dct == "auto" and format != "onnx" else acdc_dct)
    timings: dict[str, float] = {}
    tmpdir = Path(tempfile.mkdtemp(prefix="ls-export-"))
    try:
        if has_acdc and format == "onnx" and acdc_dct == "auto":
            candidates = {}
            for how in ("fft", "matmul"):
                _set_acdc_dct(work, how)
                p = tmpdir / f"{how}{SUFFIX[format]}"
                candidates[how] = (p, _write(work, x_trace, p, format, opset))
                run = load_runner(p, format)
                timings[how] = time_call(lambda run=run: run(x), repeats=20, budget_s=3.0)
            choice = min(timings, key=timings.__getitem__)
            _set_acdc_dct(work, choice)
            tmp, dynamic = candidates[choice]
        else:
            if choice is not None:
                _set_acdc_dct(work, choice)
            tmp = tmpdir / f"model{SUFFIX[format]}"
            dynamic = _write(work, x_trace, tmp, format, opset)
        checks, dynamic = _check(work, tmp, format, x, dynamic, rtol, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(tmp), str(path))
        if format == "onnx" and (tmp.parent / (tmp.name + ".data")).exists():
            shutil.move(str(tmp.parent / (tmp.name + ".data")), str(path.parent / (path.name + ".data")))
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return ExportResult(path, format, dynamic, checks, rtol, folded, choice, timings)
