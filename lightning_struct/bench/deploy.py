"""``lightning-struct bench deploy``: dense vs converted networks where they run after export.

Two networks, each dense and converted, each exported with :func:`lightning_struct.export`
(BN folded, checked against eager) and timed in three runtimes in the same process:

* **digits CNN trained here with the force** (ForceRegularization L2 1e-4, the settings of
  ``recipes/wen2017/digits_force.yaml``; 8 epochs, ``--quick`` 2), converted: low-rank at 0.95
  energy, low-rank at a parameter budget (half of the selected layers' parameters), ACDC
  (linears). The net is tiny: the rows show what the runtimes' per-call overheads do to it.
* **torchvision ResNet-50 with synthetic low-rank weights** (``bench convert``'s force-like
  spectra; random init otherwise, nothing downloaded), converted: low-rank at 0.95 energy, the
  same with ``speed_check="onnxruntime"`` (a layer is kept only if it times faster than dense in
  onnxruntime at batch 1), tied (row/column-space weight sharing in the non-downsampling
  bottlenecks).

Runtimes: eager PyTorch (``inference_mode``), ``torch.compile`` (inductor; full run only for
ResNet-50, where one compile takes minutes on 2 cores), onnxruntime (CPU, the exported ONNX).
Batches 1 and 32 at 224 px (``--quick``: ResNet-50 at batch 1 and 8, 112 px; no compile).
Each row: the converted model (``ours``) against the dense model in the *same* runtime; the
median of interleaved calls. ``extra`` holds parameters and the export check's error.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_struct.bench._harness import Row

TITLE = "deploy: dense vs converted in eager / torch.compile / onnxruntime"

__all__ = ["TITLE", "run", "train_digits_with_force"]


def train_digits_with_force(epochs: int = 8, seed: int = 0, strength: float = 1e-4, image_size: int = 8) -> nn.Module:
    """The digits CNN trained with the L2 force (``strength=0``: without); no logger, no checkpoint.

    Returns the bare net (eval mode).
    """
    import lightning.pytorch as pl

    from lightning_struct.callbacks.force import ForceRegularization
    from lightning_struct.data import DigitsDataModule
    from lightning_struct.models import ImageClassifier
    from lightning_struct.models.factories import digits_cnn

    pl.seed_everything(seed, verbose=False)
    dm = DigitsDataModule(image_size=image_size, batch_size=64, seed=seed)
    model = ImageClassifier(digits_cnn(image_size=image_size), num_classes=10)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ForceRegularization(strength=strength, kind="l2")] if strength > 0 else [],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=dm)
    return model.net.eval()


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _interleaved(calls: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    import time

    for fn in calls.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(repeats):
        for k, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _runtimes(model: nn.Module, x: torch.Tensor, workdir: Path, tag: str, compile_: bool) -> dict[str, Any]:
    """``runtime -> callable(x)`` for one model, plus the export check's error."""
    from lightning_struct.deploy import export
    from lightning_struct.deploy.runtime import load_runner

    out: dict[str, Any] = {}
    eager = copy.deepcopy(model).eval()

    def run_eager(inp: torch.Tensor, m: nn.Module = eager) -> Any:
        with torch.inference_mode():
            return m(inp)

    out["eager"] = run_eager
    if compile_:
        compiled = torch.compile(copy.deepcopy(model).eval())

        def run_compiled(inp: torch.Tensor, m: Any = compiled) -> Any:
            with torch.inference_mode():
                return m(inp)

        out["compile"] = run_compiled
    res = export(model, x, workdir / f"{tag}.onnx", "onnx")
    out["onnxruntime"] = load_runner(res.path, "onnx")
    out["_check"] = res.max_rel_error
    return out


def _variants_digits(net: nn.Module) -> dict[str, nn.Module]:
    from lightning_struct.surgery import convert

    out = {"dense": net}
    for label, kw in (
        ("lowrank e0.95", {"method": "lowrank", "energy": 0.95}),
        ("lowrank params 0.5", {"method": "lowrank", "budget": 0.5, "budget_on": "params"}),
        ("acdc linears", {"method": "acdc", "types": ["Linear"], "acdc_steps": 0}),
    ):
        m = copy.deepcopy(net)
        try:
            convert(m, input_size=(1, 8, 8), **kw)
        except (ValueError, TypeError) as err:  # a form this net cannot take is reported, not fatal
            print(f"  digits {label}: skipped ({err})", flush=True)
            continue
        out[label] = m.eval()
    return out


def _variants_resnet(size: int) -> dict[str, nn.Module]:
    import torchvision

    from lightning_struct.bench.convert import synthetic_low_rank_
    from lightning_struct.surgery import convert

    torch.manual_seed(0)
    dense = synthetic_low_rank_(torchvision.models.resnet50(weights=None)).eval()
    out = {"dense": dense}
    low = copy.deepcopy(dense)
    convert(low, "lowrank", energy=0.95, scheme="channel", input_size=(3, size, size))
    out["lowrank e0.95"] = low.eval()
    checked = copy.deepcopy(dense)  # the same rule, each layer kept only if it times faster in onnxruntime
    convert(checked, "lowrank", energy=0.95, scheme="channel", input_size=(3, size, size), speed_check="onnxruntime")
    out["lowrank e0.95 speed-checked"] = checked.eval()
    tied = copy.deepcopy(dense)
    try:
        convert(tied, "tied", input_size=(3, size, size))
        out["tied"] = tied.eval()
    except (ValueError, TypeError) as err:
        print(f"  resnet50 tied: skipped ({err})", flush=True)
    return out


def _bench(name: str, variants: dict[str, nn.Module], shape: tuple[int, ...], batches: list[int],
           compile_: bool, repeats: int) -> list[Row]:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="ls-bench-deploy-") as tmp:
        example = torch.randn(2, *shape)
        built = {}
        for label, m in variants.items():
            built[label] = _runtimes(m, example, Path(tmp), label.replace(" ", "_"), compile_)
        for batch in batches:
            x = torch.randn(batch, *shape)
            for runtime in [r for r in built["dense"] if not r.startswith("_")]:
                calls = {label: (lambda f=b[runtime], x=x: f(x)) for label, b in built.items()}
                times = _interleaved(calls, repeats)
                for label in variants:
                    if label == "dense":
                        continue
                    rows.append(
                        Row(
                            case=f"{name} {label} b{batch} {runtime}",
                            ours_s=times[label],
                            baseline="dense",
                            baseline_s=times["dense"],
                            extra={
                                "params_dense": _params(variants["dense"]),
                                "params_converted": _params(variants[label]),
                                "export_rel_error": built[label]["_check"],
                            },
                        )
                    )
                print(
                    f"  {name} b{batch} {runtime}: "
                    + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in times.items()),
                    flush=True,
                )
    return rows


def run(quick: bool = False, device: str = "cpu") -> list[Row]:
    from lightning_struct.deploy.runtime import require_onnx

    require_onnx("bench deploy")
    if device != "cpu":
        print("  bench deploy times CPU runtimes (onnxruntime CPU); running on cpu", flush=True)
    net = train_digits_with_force(epochs=2 if quick else 8)
    rows = _bench("digits", _variants_digits(net), (1, 8, 8), [1, 32], compile_=not quick, repeats=20 if quick else 50)
    size = 112 if quick else 224
    rows += _bench(
        f"resnet50 {size}px",
        _variants_resnet(size),
        (3, size, size),
        [1, 8] if quick else [1, 32],
        compile_=not quick,
        repeats=3 if quick else 7,
    )
    return rows
