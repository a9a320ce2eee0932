"""The spectral benchmark's numpy baselines compute the same spectrum as ours (else ratios mean nothing)."""

from __future__ import annotations

import numpy as np
import torch

from lightning_struct.bench import spectral as bench
from lightning_struct.ops.spectral import conv_singular_values


def test_numpy_baselines_match_ours():
    torch.manual_seed(0)
    w = torch.randn(6, 5, 3, 3, dtype=torch.float64)
    ours = np.sort(conv_singular_values(w, (8, 8)).numpy().ravel())
    sedghi = np.sort(bench.sedghi_numpy(w.numpy().transpose(2, 3, 1, 0), 8).ravel())
    lfa = np.sort(bench.lfa_numpy(w.numpy(), 8).ravel())
    np.testing.assert_allclose(sedghi, ours, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(lfa, ours, rtol=1e-9, atol=1e-11)
    assert isinstance(bench.TITLE, str)
