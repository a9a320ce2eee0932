"""Helpers of `lightning-struct bench convert`: the synthetic force-like spectra and BN folding."""

from __future__ import annotations

import copy

import torch
import torchvision
from torch import nn

from lightning_struct.bench.convert import fold_batchnorm_, synthetic_low_rank_
from lightning_struct.ops import factorize as fz
from lightning_struct.surgery import convert


def test_synthetic_spectrum_puts_95_percent_in_15_percent_of_the_rank():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(32, 64, 3), nn.Linear(100, 40))
    norms = [m.weight.norm().item() for m in net]
    synthetic_low_rank_(net, rank_fraction=0.15, energy=0.95)
    for m, n0 in zip(net, norms):
        s = fz.singular_values(m.weight.reshape(m.weight.shape[0], -1))
        full = s.numel()
        assert abs(fz.energy_rank(s, 0.95) - 0.15 * full) <= 1.0
        assert abs(m.weight.norm().item() - n0) < 1e-4 * n0  # Frobenius norm kept


def test_fold_batchnorm_is_exact_for_dense_and_lowrank_resnets():
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=5).eval()
    with torch.no_grad():
        for bn in net.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.uniform_(-0.1, 0.1)
                bn.running_var.uniform_(0.5, 1.5)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.1, 0.1)
    low = copy.deepcopy(net)
    convert(low, "lowrank", rank=8, types=["Conv2d"], exclude="conv1")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        refs = net(x), low(x)
        fold_batchnorm_(net)
        fold_batchnorm_(low)
        for m, ref in zip((net, low), refs):
            assert not any(isinstance(q, nn.BatchNorm2d) for q in m.modules())
            torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-5)
