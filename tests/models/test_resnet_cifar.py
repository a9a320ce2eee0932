"""CIFAR ResNets: parameter counts of He et al. (2016, table 6), shapes, shortcuts, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_struct.models.resnet_cifar import BasicBlock, resnet20, resnet_cifar


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# the paper rounds 1.73M to 1.7M for ResNet-110
@pytest.mark.parametrize(("depth", "millions"), [(20, 0.27), (32, 0.46), (44, 0.66), (56, 0.85), (110, 1.73)])
def test_parameter_counts_match_the_paper(depth: int, millions: float) -> None:
    assert n_params(resnet_cifar(depth)) / 1e6 == pytest.approx(millions, abs=0.006)


def test_resnet20_layout_and_forward() -> None:
    m = resnet20()
    assert n_params(m) == 269_722
    convs = [n for n, x in m.named_modules() if isinstance(x, nn.Conv2d)]
    assert len(convs) == 19 and convs[0] == "conv1" and convs[-1] == "layer3.2.conv2"
    x = torch.randn(2, 3, 32, 32)
    assert m(x).shape == (2, 10)
    # option A: stride-2 subsampling + zero channels on the shortcut
    block = m.layer2[0]
    assert isinstance(block.shortcut, nn.Identity)
    h = torch.randn(1, 16, 8, 8)
    sc = block._shortcut(h)
    assert sc.shape == (1, 32, 4, 4)
    assert (
        torch.equal(sc[:, 8:24], h[:, :, ::2, ::2])
        and sc[:, :8].abs().sum() == 0
        and sc[:, 24:].abs().sum() == 0
    )


def test_option_b_has_projections() -> None:
    m = resnet20(num_classes=5, in_channels=1, shortcut="B")
    names = [n for n, x in m.named_modules() if isinstance(x, nn.Conv2d)]
    assert "layer2.0.shortcut.0" in names and "layer3.0.shortcut.0" in names and len(names) == 21
    assert m(torch.randn(2, 1, 32, 32)).shape == (2, 5)
    assert n_params(resnet20(shortcut="B")) == 272_474


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="6n \\+ 2"):
        resnet_cifar(21)
    with pytest.raises(ValueError, match="shortcut='C'"):
        resnet20(shortcut="C")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cannot shrink"):
        BasicBlock(32, 16, 2, "A")
