"""Conversion defaults that do not surprise: stem and classifier stay dense, small savings are not
made, and a conversion never makes the parameters or the FLOPs worse."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_struct import ConversionOptions, convert
from lightning_struct.nn.lowrank import LowRankConv2d, LowRankLinear


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),  # 0: stem
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),  # 2
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1),  # 4
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 64),  # 7
        nn.ReLU(),
        nn.Linear(64, 10),  # 9: classifier
    )


def test_stem_and_classifier_stay_dense_unless_named():
    m = _net()
    report = convert(m, "lowrank", ratio=0.25, calibration=torch.randn(2, 3, 8, 8))
    names = {r.name for r in report.layers}
    assert names == {"2", "4", "7"}, "the first conv and the last Linear are not candidates by default"
    assert isinstance(m[0], nn.Conv2d) and isinstance(m[9], nn.Linear) and not isinstance(m[9], LowRankLinear)
    assert isinstance(m[2], LowRankConv2d)

    m = _net()
    convert(m, "lowrank", ratio=0.25, include=["0", "9"])  # named: converted
    assert isinstance(m[0], LowRankConv2d) and isinstance(m[9], LowRankLinear)
    m = _net()
    report = convert(m, "lowrank", ratio=0.25, include="*")
    assert {"0", "9"} <= {r.name for r in report.layers}


def test_a_small_saving_is_not_made():
    # rank 28 of a 64 -> 64 linear: 28 * 128 + 64 = 3648 vs 4160 params, a 12.3% saving
    m = _net()
    report = convert(m, "lowrank", rank=28, include="7")
    assert isinstance(m[7], LowRankLinear) and report.layers[0].status == "converted"
    m = _net()
    report = convert(m, "lowrank", rank=28, include="7", min_saving=0.2)
    row = report.layers[0]
    assert not isinstance(m[7], LowRankLinear)
    assert row.status.startswith("kept dense: saves 12.3% of the parameters (< min_saving=0.2)"), row.status
    assert report.params_after == report.params_before
    m = _net()
    convert(m, "lowrank", rank=31, include="7", min_saving=0.0)  # 4032 + 64 < 4160: any saving is taken
    assert isinstance(m[7], LowRankLinear)


def test_min_saving_is_checked():
    with pytest.raises(ValueError, match="min_saving"):
        ConversionOptions(method="lowrank", energy=0.9, min_saving=1.0)
    with pytest.raises(ValueError, match="min_saving"):
        ConversionOptions(method="lowrank", energy=0.9, min_saving=-0.1)


def test_acdc_that_would_add_flops_stays_dense():
    # a 1x1 conv 64 -> 64: 4096 params and 4096 MACs per pixel dense; 12 ACDC factors have 1536
    # params (fewer) but 12 * (2*64 + 2*64*log2 64) = 10752 MACs per pixel (more)
    m = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.Conv2d(64, 64, 1), nn.Conv2d(64, 64, 1), nn.Flatten(), nn.Linear(64 * 64, 4))
    report = convert(m, "acdc", calibration=torch.randn(2, 3, 8, 8), acdc_steps=2, include=["2"], min_saving=0.0)
    row = report.layers[0]
    assert row.status.startswith("kept dense: more FLOPs"), row.status
    assert report.flops_after == report.flops_before and report.params_after == report.params_before


@pytest.mark.parametrize("method,kw", [("lowrank", {"energy": 0.95}), ("lowrank", {"ratio": 0.9}), ("acdc", {"acdc_steps": 2})])
def test_never_worse(method, kw):
    import torchvision

    m = torchvision.models.resnet18(num_classes=10)
    report = convert(m, method, calibration=torch.randn(1, 3, 32, 32), **kw)
    assert report.params_after <= report.params_before
    assert report.flops_after <= report.flops_before
    for row in report.layers:
        if row.status == "converted":
            assert row.params_after <= 0.9 * row.params_before, row
            assert row.flops_after is None or row.flops_after <= row.flops_before, row
    assert not any(r.name in ("conv1", "fc") for r in report.layers)
