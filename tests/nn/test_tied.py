"""Row/column-space sharing: tied bottleneck and FFN against explicit transposed weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import Bottleneck
from torchvision.models.vision_transformer import MLPBlock

from lightning_struct.nn import TiedBottleneck, TiedMLP
from lightning_struct.ops.tied import tied_weight_least_squares

D = torch.float64


def _n(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _randomize_bn(block: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def test_tied_bottleneck_equals_explicit_transposed_conv() -> None:
    torch.manual_seed(0)
    blk = TiedBottleneck(16, 4).double().eval()
    _randomize_bn(blk, 1)
    x = torch.randn(2, 16, 5, 6, dtype=D)
    w = blk.conv1.weight
    assert w.shape == (4, 16, 1, 1)
    # explicit: relu(bn3(conv(G(conv(x, W)), W^T)) + x) with W^T materialised
    h = F.relu(blk.bn1(F.conv2d(x, w)))
    h = F.relu(blk.bn2(blk.conv2(h)))
    wt = w.detach().transpose(0, 1).contiguous().requires_grad_(False)
    expected = F.relu(blk.bn3(F.conv2d(h, wt)) + x)
    torch.testing.assert_close(blk(x), expected, rtol=0, atol=1e-12)
    # and the expand equals an nn.Conv2d holding W^T (the dense block with conv3 = W^T)
    dense = Bottleneck(16, 4).double().eval()
    dense.load_state_dict({**blk.state_dict(), "conv3.weight": wt}, strict=True)
    torch.testing.assert_close(dense(x), blk(x), rtol=0, atol=1e-12)


def test_tied_bottleneck_gradcheck() -> None:
    torch.manual_seed(0)
    blk = TiedBottleneck(8, 2).double().eval()
    x = torch.randn(1, 8, 3, 3, dtype=D, requires_grad=True)
    w = blk.conv1.weight

    def f(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(blk, {"conv1.weight": w}, (x,))

    assert torch.autograd.gradcheck(f, (x, w))
    # W gets the sum of both roles' gradients
    blk(x).sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_parameter_saving_per_block() -> None:
    dense, tied = Bottleneck(256, 64), TiedBottleneck(256, 64)
    assert _n(dense) - _n(tied) == 64 * 256
    mlp, tmlp = MLPBlock(64, 256, 0.0), TiedMLP(64, 256)
    assert _n(mlp) - _n(tmlp) == 64 * 256


def test_staged_sharing_counts_weight_once() -> None:
    first = TiedBottleneck(32, 8)
    others = [TiedBottleneck(32, 8, shared_weight=first.weight) for _ in range(2)]
    stage = nn.Sequential(first, *others)
    assert all(b.weight is first.weight for b in others)
    assert _n(stage) == _n(first) + 2 * (_n(first) - 8 * 32)
    # gradients from all blocks accumulate in the single W
    stage(torch.randn(2, 32, 4, 4)).sum().backward()
    g_all = first.weight.grad.clone()
    first.weight.grad = None
    first(torch.randn(2, 32, 4, 4)).sum().backward()
    assert not torch.allclose(first.weight.grad, g_all)
    # state dict round trip keeps the sharing
    re = nn.Sequential(TiedBottleneck(32, 8), *[TiedBottleneck(32, 8) for _ in range(2)])
    for b in list(re)[1:]:
        b.share_weight(re[0].weight)
    re.load_state_dict(stage.state_dict())
    torch.testing.assert_close(re[2].weight, stage[0].weight)


@pytest.mark.parametrize("mode", ["average", "balanced"])
def test_from_bottleneck_round_trip_when_already_tied(mode: str) -> None:
    torch.manual_seed(1)
    dense = Bottleneck(16, 4).double()
    _randomize_bn(dense, 2)
    with torch.no_grad():
        dense.conv3.weight.copy_(dense.conv1.weight.transpose(0, 1))
    dense.eval()
    tied = TiedBottleneck.from_bottleneck(dense, mode=mode)
    x = torch.randn(2, 16, 4, 4, dtype=D)
    tol = 0 if mode == "average" else 1e-12
    torch.testing.assert_close(tied.weight, dense.conv1.weight, rtol=0, atol=tol)
    torch.testing.assert_close(tied(x), dense(x), rtol=0, atol=1e-10)
    assert tied.conv2.weight is not dense.conv2.weight  # deep copies
    assert _n(dense) - _n(tied) == 4 * 16


def test_from_bottleneck_balanced_is_exact_when_tied_up_to_scale() -> None:
    torch.manual_seed(2)
    dense = Bottleneck(16, 4).double()
    _randomize_bn(dense, 3)
    with torch.no_grad():
        dense.conv3.weight.copy_(7.0 * dense.conv1.weight.transpose(0, 1))
    dense.eval()
    x = torch.randn(2, 16, 4, 4, dtype=D)
    balanced = TiedBottleneck.from_bottleneck(dense, mode="balanced")
    torch.testing.assert_close(balanced(x), dense(x), rtol=0, atol=1e-10)
    # the plain average is not (it changes the eval-mode scale of both roles)
    average = TiedBottleneck.from_bottleneck(dense, mode="average")
    assert (average(x) - dense(x)).abs().max() > 1e-3


def test_least_squares_closed_form_and_staged() -> None:
    g = torch.Generator().manual_seed(0)
    rs = [torch.randn(3, 5, generator=g, dtype=D) for _ in range(3)]
    es = [torch.randn(5, 3, generator=g, dtype=D) for _ in range(3)]
    w, scales = tied_weight_least_squares(rs, es, "average")
    assert scales == [(1.0, 1.0)] * 3
    # brute force: minimise sum ||R - W||^2 + ||E - W^T||^2 by gradient descent from zero
    v = torch.zeros(3, 5, dtype=D, requires_grad=True)
    opt = torch.optim.SGD([v], lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        sum(((r - v) ** 2).sum() + ((e - v.T) ** 2).sum() for r, e in zip(rs, es)).backward()
        opt.step()
    torch.testing.assert_close(w, v.detach(), rtol=0, atol=1e-10)
    # 1x1 conv layout is kept
    wc, _ = tied_weight_least_squares(rs[0][:, :, None, None], es[0][:, :, None, None])
    assert wc.shape == (3, 5, 1, 1)
    torch.testing.assert_close(wc[:, :, 0, 0], (rs[0] + es[0].T) / 2)


def test_from_bottlenecks_shares_one_weight() -> None:
    torch.manual_seed(3)
    blocks = [Bottleneck(16, 4) for _ in range(3)]
    tied = TiedBottleneck.from_bottlenecks(blocks, mode="average")
    assert all(t.weight is tied[0].weight for t in tied)
    expected = sum(b.conv1.weight + b.conv3.weight.transpose(0, 1) for b in blocks) / 6
    torch.testing.assert_close(tied[0].weight, expected.detach())


def test_downsampling_blocks_are_refused() -> None:
    proj = Bottleneck(
        64, 64, stride=2, downsample=nn.Sequential(nn.Conv2d(64, 256, 1, stride=2), nn.BatchNorm2d(256))
    )
    with pytest.raises(ValueError, match="downsampling/projection"):
        TiedBottleneck.from_bottleneck(proj)
    with pytest.raises(ValueError, match="inplanes=64"):
        TiedBottleneck(64, 64)
    with pytest.raises(ValueError, match="stride=2 needs a downsample"):
        TiedBottleneck(64, 16, stride=2)
    with pytest.raises(ValueError, match="block 1"):
        TiedBottleneck.from_bottlenecks([Bottleneck(64, 16), proj])
    with pytest.raises(ValueError, match="not a torchvision-style Bottleneck"):
        TiedBottleneck.from_bottleneck(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="shape"):
        TiedBottleneck(32, 8, shared_weight=nn.Parameter(torch.zeros(8, 16, 1, 1)))


def test_tied_mlp_matches_explicit_and_mlpblock() -> None:
    torch.manual_seed(4)
    t = TiedMLP(6, 10).double().eval()
    x = torch.randn(3, 4, 6, dtype=D)
    expected = F.gelu(x @ t.weight.T + t.bias1) @ t.weight + t.bias2
    torch.testing.assert_close(t(x), expected, rtol=0, atol=1e-12)
    block = MLPBlock(6, 10, 0.0).double().eval()
    with torch.no_grad():
        block[0].weight.copy_(t.weight)
        block[0].bias.copy_(t.bias1)
        block[3].weight.copy_(t.weight.T)
        block[3].bias.copy_(t.bias2)
    torch.testing.assert_close(block(x), t(x), rtol=0, atol=1e-12)
    # from_mlp on an already tied block is exact
    back = TiedMLP.from_mlp(block)
    torch.testing.assert_close(back.weight, t.weight, rtol=0, atol=0)
    torch.testing.assert_close(back(x), block(x), rtol=0, atol=1e-12)
    assert isinstance(back.act, nn.GELU)


def test_tied_mlp_from_untied_is_least_squares_and_gradcheck() -> None:
    torch.manual_seed(5)
    block = MLPBlock(4, 6, 0.1)
    t = TiedMLP.from_mlp(block)
    torch.testing.assert_close(t.weight, (block[0].weight + block[3].weight.T).detach() / 2)
    assert t.dropout.p == 0.1 and t.training
    t = t.double().eval()
    x = torch.randn(2, 4, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w: torch.func.functional_call(t, {"weight": w}, (x,)), (x, t.weight)
    )


def test_tied_mlp_errors() -> None:
    with pytest.raises(ValueError, match="exactly two"):
        TiedMLP.from_mlp(nn.Sequential(nn.Linear(3, 4)))
    with pytest.raises(ValueError, match="cannot tie"):
        TiedMLP.from_mlp(nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 5)))
    with pytest.raises(ValueError, match="dropout"):
        TiedMLP(3, 4, dropout=1.5)
