"""budget_on="latency": ranks chosen by the clock hit the latency asked for; a FLOP budget does not."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision

from lightning_struct.bench.convert import synthetic_low_rank_
from lightning_struct.surgery import ConversionOptions, convert
from lightning_struct.surgery.conversion import _latency_ratio


@pytest.mark.slow
def test_resnet50_latency_budget_lands_within_ten_percent():
    """ResNet-50 (random init + force-like low-rank spectra, as `bench convert`), batch 1, 112 px, CPU.

    Measured on the 2-core development machine: budget_on="latency", budget=0.6 re-measured at
    0.595-0.622 of the dense forward time (224 px: 0.589; budget 0.8: 0.782);
    budget_on="flops", budget=0.6 runs at 0.89-1.01 of the dense time.
    """
    torch.manual_seed(0)
    dense = synthetic_low_rank_(torchvision.models.resnet50(weights=None)).eval()
    shape = (3, 112, 112)
    ratio = _latency_ratio(dense, torch.zeros(1, *shape), ConversionOptions(method="lowrank", energy=0.9))
    got = {}
    for on in ("latency", "flops"):
        m = copy.deepcopy(dense)
        report = convert(m, "lowrank", budget=0.6, budget_on=on, scheme="channel", input_size=shape)
        low = {n: mod for n, mod in m.named_modules() if type(mod).__name__ == "LowRankConv2d"}
        got[on] = sorted(ratio(low) for _ in range(3))[1]  # re-measured, interleaved with the dense net
        if on == "latency":
            assert report.latency_ratio is not None and "conversion/latency_ratio" in report.scalars()
            timed = [r for r in report.layers if r.status == "converted"]
            assert timed and all(r.detail["converted_ms"] < r.detail["dense_ms"] for r in timed)
    print(f"\nlatency budget 0.6 -> {got['latency']:.3f}; flops budget 0.6 -> {got['flops']:.3f} of the dense time")
    assert 0.54 <= got["latency"] <= 0.66, got
    assert got["flops"] > got["latency"] + 0.1, got  # FLOPs are not latency


def test_latency_budget_is_a_fraction_and_needs_shapes():
    with pytest.raises(ValueError, match="fraction"):
        ConversionOptions(method="lowrank", budget=2.0, budget_on="latency")
    with pytest.raises(ValueError, match="needs input shapes"):
        convert(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)), "lowrank", budget=0.5, budget_on="latency")
