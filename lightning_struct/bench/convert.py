"""``lightning-struct bench convert``: ResNet-50 inference, dense vs low-rank at 0.95 energy.

Two weight sets of a torchvision ResNet-50 (``weights=None``, eval mode, ``torch.inference_mode``):

* **random init**: torchvision's Kaiming initialisation. Random matrices have flat spectra, so
  keeping 95% of the squared singular values needs most of the rank and almost every layer is
  "not cheaper -> stays dense": the honest baseline that conversion alone buys nothing.
* **force-like (synthetic low-rank)**: every conv / linear weight keeps its random singular
  vectors but gets a decaying spectrum ``s_i = s_1 exp(-i / tau)`` with ``tau`` set so that 95%
  of the squared singular values sit in the first ``rank_fraction`` (15%) of the rank - the kind
  of spectrum force regularization produces (Wen et al. 2017 report ranks cut to a fraction of
  the width, e.g. ResNet-20 conv ranks 16/32/64 -> ~10/9/1-2; our fraction is an assumption,
  not their number). BN layers are untouched.

A third row (full run only) folds the BatchNorms into the preceding convs of *both* models
(the usual inference optimisation): BN is a fixed per-pixel cost that conversion cannot shrink.

Each model is converted with ``convert(model, "lowrank", energy=0.95, scheme="channel")``
(channel decomposition: ``k x k`` conv to ``r`` channels + ``1 x 1``; 1x1 convs and the fc
become two thin layers). Timed: one forward of batch 8 at 224 x 224 (``--quick``: batch 2 at
112 x 112), median of repeated runs; ratio = dense / low-rank. ``extra`` holds parameters,
FLOPs (multiply-accumulates per image) and the number of converted layers.

Two more rows put the rank rules side by side on the force-like weights: ``budget=0.6`` of the
dense FLOPs and ``budget=0.6`` of the dense measured latency (``budget_on="latency"``, which
bisects the allocation on the whole network's measured time): only the second lands near 0.6x.

Last, the objectives on a *trained* network (random weights cannot show them): a ResNet-20
trained on the scikit-learn digits resized to 32 x 32 (:func:`train_resnet20_digits`, 8 epochs,
``--quick`` 3), converted at ``budget=0.3`` of the selected layers' parameters with
``objective="weight"``, ``"output"`` and ``"output"`` + ``sequential=True`` (calibration: two
training batches). Each row times the conversion against the weight objective's conversion and
carries the val top-1 right after it (no fine-tuning) and the logit error.
"""

from __future__ import annotations

import copy
import math
import statistics
from typing import Any

import torch
from torch import nn

from lightning_struct.bench._harness import Row, median_time

TITLE = "ResNet-50 inference: low-rank (0.95 energy) vs dense"

__all__ = ["TITLE", "fold_batchnorm_", "run", "synthetic_low_rank_", "train_resnet20_digits"]


@torch.no_grad()
def synthetic_low_rank_(model: nn.Module, rank_fraction: float = 0.15, energy: float = 0.95) -> nn.Module:
    """Give every conv / linear weight a decaying spectrum (in place); returns ``model``.

    A weight viewed as ``N x (C k^2)`` with full rank ``m`` is replaced by ``U S V^T`` with random
    orthonormal ``U``, ``V`` (QR of Gaussian matrices, seeded) and singular values
    ``s_i ~ exp(-i / tau)``, ``i = 0..m-1``, ``tau = 2 r / ln(1 / (1 - energy))``,
    ``r = rank_fraction * m``, so that the first ``r`` values hold ``energy`` of ``sum s^2``.
    The Frobenius norm of the original weight is kept.
    """
    if not 0 < rank_fraction <= 1:
        raise ValueError(f"rank_fraction={rank_fraction!r} must be in (0, 1]")
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        w = m.weight
        rows, cols = w.shape[0], w[0].numel()
        full = min(rows, cols)
        u = torch.linalg.qr(torch.randn(rows, full, generator=gen))[0]
        v = torch.linalg.qr(torch.randn(cols, full, generator=gen))[0]
        r = max(1.0, rank_fraction * full)
        tau = 2.0 * r / math.log(1.0 / (1.0 - energy))
        s = torch.exp(-torch.arange(full, dtype=torch.float32) / tau)
        s *= w.detach().float().norm() / s.norm()
        w.copy_(((u * s) @ v.T).reshape(w.shape).to(device=w.device, dtype=w.dtype))
    return model


@torch.no_grad()
def fold_batchnorm_(model: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm2d into the conv registered just before it (in place).

    Valid for torchvision ResNets, whose blocks register ``convK, bnK`` pairs in forward order
    (and ``downsample = Sequential(conv, bn)``); a ``LowRankConv2d`` takes the BN into its last
    factor. The standard inference optimisation, applied to dense and low-rank alike.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    from lightning_struct.nn.lowrank import LowRankConv2d

    for parent in list(model.modules()):
        prev_name, prev = None, None
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.BatchNorm2d) and prev is not None:
                if isinstance(prev, nn.Conv2d):
                    setattr(parent, prev_name, fuse_conv_bn_eval(prev.eval(), child.eval()))  # type: ignore[arg-type]
                    setattr(parent, name, nn.Identity())
                elif isinstance(prev, LowRankConv2d):
                    last = prev.factors[-1]
                    attr = {"channel": "second", "spatial": "horizontal", "tucker2": "last"}[prev.scheme]
                    setattr(prev, attr, fuse_conv_bn_eval(last.eval(), child.eval()))
                    setattr(parent, name, nn.Identity())
            prev_name, prev = name, child
    return model


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run(quick: bool = False, device: str = "cpu") -> list[Row]:
    """Dense vs low-rank ResNet-50 forward for the two weight sets."""
    import torchvision

    from lightning_struct.surgery import convert

    batch, size = (2, 112) if quick else (8, 224)
    repeats = 3 if quick else 7
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size, device=device)
    rows: list[Row] = []
    base = torchvision.models.resnet50(weights=None).eval()
    synthetic = synthetic_low_rank_(copy.deepcopy(base))
    for label, weights, fold in (
        ("random init", base, False),
        ("force-like (synthetic low-rank)", synthetic, False),
        ("force-like, BN folded (both)", synthetic, True),
    ):
        if quick and fold:
            continue
        dense = copy.deepcopy(weights).to(device).eval()
        low = copy.deepcopy(dense)
        report = convert(low, "lowrank", energy=0.95, scheme="channel", input_size=(3, size, size))
        low.eval()
        if fold:
            fold_batchnorm_(dense)
            fold_batchnorm_(low)

        def fwd(model: nn.Module) -> None:
            with torch.inference_mode():
                model(x)

        # interleaved (dense, low, dense, low, ...) so that load drifts hit both alike
        t_dense_all, t_low_all = [], []
        for _ in range(repeats):
            t_dense_all.append(
                median_time(lambda m=dense: fwd(m), repeats=1, warmup=0 if t_dense_all else 1, device=device)
            )
            t_low_all.append(
                median_time(lambda m=low: fwd(m), repeats=1, warmup=0 if t_low_all else 1, device=device)
            )
        t_dense, t_low = statistics.median(t_dense_all), statistics.median(t_low_all)
        with torch.inference_mode():
            err = float((low(x) - dense(x)).norm() / dense(x).norm())
        rows.append(
            Row(
                case=f"resnet50 {label}, b{batch} {size}px",
                ours_s=t_low,
                baseline="dense",
                baseline_s=t_dense,
                extra={
                    "params_dense": _params(dense),
                    "params_lowrank": _params(low),
                    "flops_dense": report.flops_before,
                    "flops_lowrank": report.flops_after,
                    "layers_converted": len(report.converted),
                    "layers_selected": len(report.layers),
                    "logit_rel_error": err,
                    # min of runs: robust to other processes stealing the cores (timeit's advice)
                    "ours_min_s": min(t_low_all),
                    "baseline_min_s": min(t_dense_all),
                },
            )
        )
        print(
            f"  {label}: params {_params(dense):,} -> {_params(low):,}, MACs/img {report.flops_before:,} -> "
            f"{report.flops_after:,}, {len(report.converted)}/{len(report.layers)} layers converted, "
            f"logit rel. error {err:.3g}; min-of-runs ratio {min(t_dense_all) / min(t_low_all):.2f}x",
            flush=True,
        )
    # rank choice by the clock: a budget of 0.6 of the dense latency vs 0.6 of the dense FLOPs
    dense = copy.deepcopy(synthetic).to(device).eval()
    for on in ("flops", "latency"):
        low = copy.deepcopy(dense)
        report = convert(low, "lowrank", budget=0.6, budget_on=on, scheme="channel", input_size=(3, size, size), speed_batch=batch)
        low.eval()
        t_d, t_l = [], []
        for _ in range(repeats):
            t_d.append(median_time(lambda m=dense: _forward(m, x), repeats=1, warmup=0 if t_d else 1, device=device))
            t_l.append(median_time(lambda m=low: _forward(m, x), repeats=1, warmup=0 if t_l else 1, device=device))
        rows.append(
            Row(
                case=f"resnet50 force-like, budget 0.6 of {on}, b{batch} {size}px",
                ours_s=statistics.median(t_l),
                baseline="dense",
                baseline_s=statistics.median(t_d),
                extra={"params_lowrank": _params(low), "layers_converted": len(report.converted),
                       "latency_ratio_at_convert": report.latency_ratio},
            )  # fmt: skip
        )
        print(f"  budget 0.6 of {on}: time ratio {statistics.median(t_l) / statistics.median(t_d):.3f} of dense", flush=True)
    rows += _objective_rows(epochs=3 if quick else 8)
    return rows


def train_resnet20_digits(epochs: int = 8, strength: float = 0.0, seed: int = 0) -> tuple[nn.Module, Any]:
    """ResNet-20 (option-A shortcuts) trained on the digits at 32 x 32: Adam 1e-3, cosine schedule,
    the L2 force at ``strength`` (0: none); no logger, no checkpoint. Returns ``(net, datamodule)``."""
    import functools
    import warnings

    import lightning.pytorch as pl

    from lightning_struct.callbacks.force import ForceRegularization
    from lightning_struct.data import DigitsDataModule
    from lightning_struct.models import ImageClassifier
    from lightning_struct.models.resnet_cifar import resnet20

    pl.seed_everything(seed, verbose=False)
    dm = DigitsDataModule(image_size=32, batch_size=64, seed=seed)
    model = ImageClassifier(
        resnet20(num_classes=10, in_channels=1), num_classes=10,
        optimizer=functools.partial(torch.optim.Adam, lr=1e-3),
        scheduler=functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=epochs),
    )  # fmt: skip
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[ForceRegularization(strength=strength, kind="l2")] if strength else [],
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=dm)
    dm.setup("fit")
    return model.net.eval(), dm


def _objective_rows(epochs: int) -> list[Row]:
    """Weight vs output vs sequential objective on a trained ResNet-20 at 30% of the parameters."""
    import time

    from lightning_struct.surgery import convert

    net, dm = train_resnet20_digits(epochs=epochs)
    x, y = (torch.cat(t) for t in zip(*[(b[0], b[1]) for b in dm.val_dataloader()]))
    cal = torch.cat([b[0] for _, b in zip(range(2), dm.train_dataloader())])
    with torch.inference_mode():
        ref = net(x)
    top1_dense = float((ref.argmax(-1) == y).float().mean())
    rows, base_s = [], None
    for label, kw in (("weight", {}), ("output", {"objective": "output"}), ("output, sequential", {"objective": "output", "sequential": True})):
        low = copy.deepcopy(net)
        t0 = time.perf_counter()
        report = convert(low, "lowrank", budget=0.3, budget_on="params", calibration=cal, min_saving=0.0, **kw)
        took = time.perf_counter() - t0
        base_s = took if base_s is None else base_s
        with torch.inference_mode():
            out = low.eval()(x)
        top1 = float((out.argmax(-1) == y).float().mean())
        err = float((out - ref).norm() / ref.norm())
        rows.append(
            Row(
                case=f"resnet20 digits 32px ({epochs} ep), budget 0.3 of params, objective={label}",
                ours_s=took, baseline="objective=weight (conversion time)", baseline_s=base_s,
                extra={"val_top1": top1, "val_top1_dense": top1_dense, "logit_rel_error": err,
                       "params_before": report.params_before, "params_after": report.params_after},
            )  # fmt: skip
        )
        print(f"  resnet20 objective={label}: val top-1 {top1:.2%} (dense {top1_dense:.2%}), logit rel. error {err:.3f}, "
              f"conversion {took:.1f} s", flush=True)  # fmt: skip
    return rows


def _forward(model: nn.Module, x: torch.Tensor) -> None:
    with torch.inference_mode():
        model(x)
