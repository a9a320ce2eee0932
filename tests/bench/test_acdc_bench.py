"""The ACDC benchmark's machinery on a small case (the full case runs via ``lightning-struct bench acdc``)."""

from __future__ import annotations

import torch

from lightning_struct.bench import acdc as bench_acdc
from lightning_struct.nn import ACDCStack


def test_torch_dct_baseline_computes_the_same_stack() -> None:
    ours = ACDCStack(64, n_factors=3, bias=True)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.1 * torch.randn_like(p))
    base = bench_acdc.TorchDctACDCStack(ours)
    x = torch.randn(5, 64)
    torch.testing.assert_close(base(x), ours(x), rtol=1e-4, atol=1e-5)


def test_small_case_rows() -> None:
    rows = bench_acdc._case(64, 8, 3, bias=False, repeats=1, rounds=1, device="cpu")
    assert [r.baseline for r in rows] == ["nn.Linear", "torch-dct ACDC"]
    assert rows[0].extra["params_ours"] == 3 * 2 * 64 and rows[0].extra["params_dense"] == 64 * 64 + 64
    assert all(r.ours_s > 0 and r.baseline_s > 0 for r in rows)
    assert set(rows[0].to_json()) >= {"case", "ours_s", "baseline", "baseline_s", "ratio"}
