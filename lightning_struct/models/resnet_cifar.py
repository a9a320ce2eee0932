"""CIFAR-style ResNets (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, sec. 4.2).

For 32x32 inputs: a 3x3 conv with 16 channels, three stages of ``n`` basic blocks with 16, 32
and 64 channels (feature maps 32, 16, 8; the first block of stages 2 and 3 has stride 2),
global average pooling and one Linear classifier: ``6n + 2`` weighted layers (ResNet-20:
``n = 3``, 0.27 M parameters).

Shortcuts where the shape changes (stage 2 and 3 entries):

* ``"A"`` (the paper's CIFAR choice, parameter-free): the input is subsampled with stride 2
  (``x[:, :, ::2, ::2]``) and zero-padded along channels; no projection layers exist, so a
  force regularizer touches only the 3x3 convs;
* ``"B"``: a 1x1 conv with stride 2 followed by BatchNorm (``layerK.0.shortcut.0`` / ``.1``);
  the authors' force runs excluded those projections (``exclude: ["*.shortcut.*"]``).

Layer names follow torchvision's ResNet: ``conv1``/``bn1``, ``layer1..3.<block>.conv1/bn1/conv2/bn2``,
``fc``. Convs use Kaiming-normal (fan-out) initialisation, BatchNorm weight 1 and bias 0.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lightning_struct._checks import check_choice

Shortcut = Literal["A", "B"]

__all__ = ["BasicBlock", "CifarResNet", "resnet20", "resnet_cifar"]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (ReLU after the sum)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: Shortcut = "A") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.mode = shortcut
        self.pad = 0
        self.stride = stride
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            if shortcut == "B":
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
                )
            else:
                if planes < in_planes:
                    raise ValueError(f"option-A shortcut cannot shrink channels ({in_planes} -> {planes})")
                self.pad = planes - in_planes

    def _shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "A" and (self.stride != 1 or self.pad):
            x = x[:, :, :: self.stride, :: self.stride]
            return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return self.shortcut(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, in_planes, H, W)`` -> ``(B, planes, H / stride, W / stride)``."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self._shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images (see the module docstring).

    Args:
        n: basic blocks per stage (3 -> ResNet-20, 5 -> 32, 7 -> 44, 9 -> 56, 18 -> 110).
        num_classes: logits.
        in_channels: input channels.
        widths: channels of the three stages.
        shortcut: ``"A"`` (zero-padding identity) or ``"B"`` (1x1 projection + BN).
    """

    def __init__(
        self,
        n: int = 3,
        num_classes: int = 10,
        in_channels: int = 3,
        widths: tuple[int, int, int] = (16, 32, 64),
        shortcut: Shortcut = "A",
    ) -> None:
        super().__init__()
        # 'A': zero-padding identity, 'B': 1x1 projection
        check_choice(shortcut, "shortcut", ("A", "B"), "CifarResNet")
        if n < 1:
            raise ValueError(f"n (blocks per stage) must be >= 1, got {n}")
        w1, w2, w3 = (int(w) for w in widths)
        self.conv1 = nn.Conv2d(in_channels, w1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w1)
        self.layer1 = self._stage(w1, w1, n, 1, shortcut)
        self.layer2 = self._stage(w1, w2, n, 2, shortcut)
        self.layer3 = self._stage(w2, w3, n, 2, shortcut)
        self.fc = nn.Linear(w3, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _stage(in_planes: int, planes: int, n: int, stride: int, shortcut: Shortcut) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride, shortcut)]
        blocks += [BasicBlock(planes, planes, 1, shortcut) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, in_channels, H, W)`` (32x32 for CIFAR) -> logits ``(B, num_classes)``."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet_cifar(
    depth: int = 20, num_classes: int = 10, in_channels: int = 3, shortcut: Shortcut = "A"
) -> CifarResNet:
    """CIFAR ResNet of ``depth = 6n + 2`` layers (20, 32, 44, 56, 110, ...)."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110), got {depth}")
    return CifarResNet((depth - 2) // 6, num_classes=num_classes, in_channels=in_channels, shortcut=shortcut)


def resnet20(num_classes: int = 10, in_channels: int = 3, shortcut: Shortcut = "A") -> CifarResNet:
    """ResNet-20 for 32x32 images (He et al. 2016): 19 convs + 1 Linear, 0.27 M parameters with
    option-A shortcuts (the default, as in the paper's CIFAR-10 experiments)."""
    return resnet_cifar(20, num_classes=num_classes, in_channels=in_channels, shortcut=shortcut)
