"""LowRankConv2d / LowRankLinear: exact at full rank, fold back, gradients, rank rules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_struct.nn import LowRankConv2d, LowRankLinear
from lightning_struct.ops import factorize as fz

SCHEMES = ["channel", "spatial", "tucker2"]

# nn.Conv2d kwargs covering stride, padding (int/pair/'same'/'valid'), padding modes, dilation,
# groups and rectangular kernels
CONVS = [
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1),
    dict(in_channels=3, out_channels=8, kernel_size=(3, 5), stride=(2, 1), padding=(1, 2)),
    dict(in_channels=6, out_channels=6, kernel_size=3, stride=2, dilation=(2, 1), groups=3, bias=False),
    dict(in_channels=4, out_channels=4, kernel_size=(2, 3), padding="same"),
    dict(in_channels=4, out_channels=5, kernel_size=3, padding="valid", dilation=2),
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, padding_mode="reflect", groups=2),
    dict(in_channels=3, out_channels=4, kernel_size=(1, 3), padding=(0, 1), padding_mode="circular"),
    dict(in_channels=8, out_channels=8, kernel_size=3, padding=1, groups=8),  # depthwise
    dict(in_channels=5, out_channels=7, kernel_size=1),
]


def _ids(c: dict) -> str:
    return "-".join(f"{k[:3]}{v}" for k, v in c.items())


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("kw", CONVS, ids=_ids)
def test_full_rank_conv_equals_dense(scheme, kw):
    torch.manual_seed(0)
    conv = nn.Conv2d(**kw)
    x = torch.randn(2, kw["in_channels"], 11, 10)
    low = LowRankConv2d.from_dense(conv, scheme=scheme)
    torch.testing.assert_close(low(x), conv(x), rtol=0, atol=1e-5)
    # fold back: the same kernel and the same function
    dense = low.to_dense()
    torch.testing.assert_close(dense.weight, conv.weight, rtol=0, atol=1e-5)
    torch.testing.assert_close(dense(x), conv(x), rtol=0, atol=1e-5)
    assert dense.stride == conv.stride and dense.padding == conv.padding and dense.groups == conv.groups
    assert dense.padding_mode == conv.padding_mode


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("kw", CONVS[:3], ids=_ids)
def test_truncated_conv_equals_its_folded_dense(scheme, kw):
    """At any rank the factor chain is one linear conv: to_dense reproduces it exactly."""
    torch.manual_seed(1)
    conv = nn.Conv2d(**kw).double()
    low = LowRankConv2d.from_dense(conv, rank=2 if scheme != "tucker2" else (2, 3), scheme=scheme)
    x = torch.randn(2, kw["in_channels"], 9, 8, dtype=torch.float64)
    torch.testing.assert_close(low.to_dense()(x), low(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_truncated_conv_error_is_discarded_energy(scheme):
    torch.manual_seed(2)
    conv = nn.Conv2d(6, 8, 3, padding=1, groups=2).double()
    s = fz.conv_spectrum(conv.weight, scheme, 2)
    for r in (1, 2, 3):
        low = LowRankConv2d.from_dense(conv, rank=r, scheme=scheme)
        err = float(((low.to_dense().weight - conv.weight) ** 2).sum().detach())
        assert err == pytest.approx(float((s[:, r:] ** 2).sum()), rel=1e-9)


def test_linear_full_rank_round_trip_and_eckart_young():
    torch.manual_seed(0)
    lin = nn.Linear(12, 7)
    x = torch.randn(3, 5, 12)
    low = LowRankLinear.from_dense(lin)
    assert low.rank == 7
    torch.testing.assert_close(low(x), lin(x), rtol=0, atol=1e-5)
    torch.testing.assert_close(low.to_dense().weight, lin.weight, rtol=0, atol=1e-5)
    lin64 = lin.double()
    s = torch.linalg.svdvals(lin64.weight)
    low3 = LowRankLinear.from_dense(lin64, rank=3)
    err = float(((low3.to_dense().weight - lin64.weight) ** 2).sum().detach())
    assert err == pytest.approx(float((s[3:] ** 2).sum()), rel=1e-9)
    torch.testing.assert_close(low3.to_dense().bias, lin64.bias)


def test_rank_rules_in_from_dense():
    torch.manual_seed(3)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    s = fz.conv_spectrum(conv.weight, "channel")
    assert LowRankConv2d.from_dense(conv, energy=0.9).rank == fz.energy_rank(s, 0.9)
    assert LowRankConv2d.from_dense(conv, ratio=0.5).rank == 8  # full rank 16
    assert LowRankConv2d.from_dense(conv, rank=500).rank == 16  # clipped
    t = LowRankConv2d.from_dense(conv, scheme="tucker2", energy=0.9)
    s_in, s_out = fz.conv_spectrum(conv.weight, "tucker2")
    assert t.rank == (fz.energy_rank(s_in, 0.9), fz.energy_rank(s_out, 0.9))
    assert LowRankConv2d.from_dense(conv, scheme="tucker2", rank=(3, 5)).rank == (3, 5)
    with pytest.raises(ValueError, match="at most one rank rule"):
        LowRankConv2d.from_dense(conv, rank=2, energy=0.9)
    lin = nn.Linear(10, 20)
    assert LowRankLinear.from_dense(lin, energy=0.999999).rank <= 10


@pytest.mark.parametrize("scheme", SCHEMES)
def test_param_count_matches_cost_model(scheme):
    conv = nn.Conv2d(6, 8, (3, 5), groups=2)
    low = LowRankConv2d.from_dense(conv, rank=2, scheme=scheme)
    n_params = sum(p.numel() for p in low.parameters())
    assert n_params == fz.conv_factor_params(scheme, conv.weight.shape, low.rank, 2, bias=True)
    lin = LowRankLinear.from_dense(nn.Linear(9, 5), rank=3)
    assert sum(p.numel() for p in lin.parameters()) == fz.linear_factor_params(5, 9, 3)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_gradcheck_conv(scheme):
    torch.manual_seed(4)
    conv = nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2).double()
    low = LowRankConv2d.from_dense(conv, rank=1 if scheme != "tucker2" else (1, 2), scheme=scheme)
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    params = tuple(low.parameters())

    def f(inp, *ps):
        sd = {n: p for (n, _), p in zip(low.named_parameters(), ps)}
        return torch.func.functional_call(low, sd, (inp,))

    assert torch.autograd.gradcheck(f, (x, *params))


def test_gradcheck_linear():
    low = LowRankLinear(5, 4, 2).double()
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    ps = tuple(low.parameters())

    def f(inp, *p):
        return torch.func.functional_call(low, {n: t for (n, _), t in zip(low.named_parameters(), p)}, (inp,))

    assert torch.autograd.gradcheck(f, (x, *ps))


def test_spec_round_trip_rebuilds_same_structure():
    conv = nn.Conv2d(6, 8, (3, 5), stride=(2, 1), padding=(1, 2), groups=2)
    for scheme in SCHEMES:
        low = LowRankConv2d.from_dense(conv, rank=2, scheme=scheme)
        rebuilt = LowRankConv2d.from_spec(low.spec())
        rebuilt.load_state_dict(low.state_dict())
        x = torch.randn(1, 6, 7, 7)
        torch.testing.assert_close(rebuilt(x), low(x))
    lin = LowRankLinear.from_dense(nn.Linear(6, 4), rank=2)
    assert LowRankLinear.from_spec(lin.spec()).first.weight.shape == (2, 6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="scheme='cp'"):
        LowRankConv2d(4, 4, 3, 2, scheme="cp")
    with pytest.raises(ValueError, match="divisible by groups=3"):
        LowRankConv2d(4, 6, 3, 2, groups=3)
    with pytest.raises(ValueError, match="rank=0"):
        LowRankLinear(4, 4, 0)
    with pytest.raises(TypeError, match="expects an nn.Conv2d"):
        LowRankConv2d.from_dense(nn.Linear(3, 3))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="takes an int rank"):
        LowRankConv2d(4, 4, 3, (2, 2), scheme="channel")
    low = LowRankConv2d(4, 4, 3, 9)
    with pytest.raises(ValueError, match="exceeds the full rank"):
        low.load_factors(torch.randn(4, 4, 3, 3))
