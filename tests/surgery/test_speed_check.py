"""Conversions and exports that never keep a layer slower than its dense original where it runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_struct.deploy import export
from lightning_struct.deploy.runtime import has_onnx, time_modules
from lightning_struct.nn import ACDCStack, LowRankLinear
from lightning_struct.surgery import ConversionOptions, convert


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def test_acdc_slower_than_its_dense_layer_stays_dense():
    """A 12-factor ACDC stack of width 256 costs ~50x a 256x256 GEMM at batch 1: measured, kept dense."""
    model = _mlp()
    report = convert(model, "acdc", include="2", acdc_steps=0, input_size=(32,), speed_check="eager")
    row = next(r for r in report.layers if r.name == "2")
    assert row.status.startswith("kept dense: slower in eager"), row.status
    assert row.detail["converted_ms"] > row.detail["dense_ms"]
    assert type(model[2]) is nn.Linear and report.params_after == report.params_before


def test_speed_check_decides_by_the_measurement(monkeypatch):
    """The decision follows time_modules: faster -> converted, not faster -> dense (timings stubbed)."""
    calls = []

    def fake(modules, shape, runtime="eager", **_):
        calls.append((shape, runtime))
        new = modules["new"]
        return {"dense": 1.0, "new": 0.5 if new.rank < 20 else 2.0}

    monkeypatch.setattr("lightning_struct.deploy.runtime.time_modules", fake)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64))
    with torch.no_grad():  # layer 1 low rank (rank 8), layer 2 rank 30 (still saves parameters)
        model[1].weight.copy_(torch.randn(64, 8) @ torch.randn(8, 64))
        model[2].weight.copy_(torch.randn(64, 24) @ torch.randn(24, 64))
    report = convert(model, "lowrank", rank=8, include=["1"], input_size=(64,), speed_check="onnxruntime", speed_batch=4)
    assert isinstance(model[1], LowRankLinear) and calls == [((4, 64), "onnxruntime")]
    model2 = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    report = convert(model2, "lowrank", rank=24, include=["1"], input_size=(64,), speed_check="eager")
    assert type(model2[1]) is nn.Linear
    assert report.layers[0].status == "kept dense: slower in eager (2000.000 ms vs 1000.000 ms dense)"


def test_speed_check_needs_shapes_and_a_known_runtime():
    with pytest.raises(ValueError, match="needs input shapes"):
        convert(_mlp(), "lowrank", energy=0.5, speed_check="eager")
    with pytest.raises(ValueError, match="speed_check"):
        ConversionOptions(method="lowrank", energy=0.5, speed_check="tensorrt")


def test_time_modules_caches_per_configuration():
    a, b = nn.Linear(16, 16), nn.Linear(16, 16)
    first = time_modules({"a": a}, (2, 16))
    again = time_modules({"b": b}, (2, 16))  # same configuration and shape: the cached figure
    assert again["b"] == first["a"] > 0


def test_export_fold_slower_folds_what_is_slower_dense(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(ACDCStack(256, n_factors=12, relu=False), nn.Linear(256, 4)).eval()
    res = export(model, torch.randn(1, 256), tmp_path / "slower.pt2", "exported_program", fold="slower")
    assert res.folded["slower"] == ["0"]  # one GEMM beats twelve DCT pairs at this width
    assert res.max_rel_error <= 1e-4


@pytest.mark.skipif(not has_onnx(), reason="the export extra is not installed")
def test_time_modules_in_onnxruntime():
    t = time_modules({"lin": nn.Linear(8, 8)}, (1, 8), "onnxruntime")
    assert t["lin"] > 0



def test_speed_check_eager_reports_the_whole_network_latency_for_any_rank_rule():
    """An energy rule with speed_check='eager' reports latency_ratio: the converted network's
    measured time over the dense one (here a 1024-wide MLP at rank 16: well below 1)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
    with torch.no_grad():
        model[2].weight.copy_(torch.randn(1024, 16) @ torch.randn(16, 1024) / 32)
    report = convert(model, "lowrank", energy=0.99, include=["2"], input_size=(64,), speed_check="eager", speed_batch=64)
    assert isinstance(model[2], LowRankLinear)
    assert report.latency_ratio is not None and 0.0 < report.latency_ratio < 0.9, report.latency_ratio
    assert report.scalars()["conversion/latency_ratio"] == report.latency_ratio
    plain = convert(_mlp(), "lowrank", energy=0.5, input_size=(32,))
    assert plain.latency_ratio is None  # nothing measured, nothing claimed
