"""The fftconv benchmark: rows, baselines and the autotuned-choice rows on a tiny case."""

from __future__ import annotations

import torch

from lightning_struct.bench import fftconv as bench
from lightning_struct.bench._harness import Row


def test_run_case_rows() -> None:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = bench.run_case(bench.Case("depthwise", 5, 16, batch=2, channels=2), modes=("fwd", "train"))
    finally:
        torch.set_num_threads(n)
    assert all(isinstance(r, Row) and r.ours_s > 0 and r.baseline_s > 0 for r in rows)
    assert [(r.case.split()[-1], r.baseline) for r in rows] == [
        ("fwd", "F.conv2d"),
        ("fwd", "fft-conv-pytorch"),
        ("fwd/autotuned", "F.conv2d"),
        ("train", "F.conv2d"),
        ("train", "fft-conv-pytorch"),
        ("train/autotuned", "F.conv2d"),
    ]
    for auto, direct in ((rows[2], rows[0]), (rows[5], rows[3])):
        chosen = direct.ours_s if auto.extra["choice"] == "fft" else direct.baseline_s
        assert auto.ours_s == chosen and auto.baseline_s == direct.baseline_s
    assert rows[0].to_json()["extra"]["kind"] == "depthwise"


def test_quick_grid_keeps_a_large_dense_case() -> None:
    cases = bench.cases(quick=True)
    assert any(c.kind == "dense" and c.k >= 15 and c.n >= 128 for c in cases)
    full = bench.cases(quick=False)
    assert {(c.k, c.n) for c in full if c.kind == "dense"} == {
        (k, n) for k in bench.KERNELS for n in bench.SIZES
    }
    assert {(c.k, c.n) for c in full if c.kind == "depthwise"} == {
        (k, n) for k in bench.KERNELS for n in bench.SIZES
    }
