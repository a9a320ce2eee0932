"""A large-kernel convnet (RepLKNet-like) whose big convolutions are FFT candidates.

Large kernels are where FFT convolution pays (Mathieu et al. 2014; the cost of an FFT conv does
not grow with the kernel). The network pairs a large-kernel stem with stages of RepLKNet-style
blocks (Ding et al., "Scaling Up Your Kernels to 31x31", CVPR 2022, simplified: no structural
re-parameterisation of a parallel small kernel):

Layout (names matter: the FFTConvolution recipes select layers by them)::

    stem.conv1            stem_kernel x stem_kernel, in_channels -> widths[0], stride 2  + bn1, relu
    stem.conv2            depthwise 3x3, stride 2                                        + bn2, relu
    stem.conv3            1x1                                                            + bn3, relu
    stages.<i>.<j>.lk     large-kernel block, residual:
        .norm .pw1          BN, 1x1 conv, ReLU
        .dw                 depthwise dw_kernels[i] x dw_kernels[i] (padding k//2)        + bn, relu
        .pw2                1x1 conv
    stages.<i>.<j>.ffn    ConvFFN, residual: BN, 1x1 (x ffn_ratio), GELU, 1x1
    transitions.<i>       1x1 widths[i] -> widths[i+1] + BN + ReLU, depthwise 3x3 stride 2 + BN + ReLU
    head                  BN, global average pool, linear

The large-kernel layers are ``stem.conv1`` and ``stages.*.lk.dw``. The ImageNet default is a
RepLKNet-31B-like configuration (kernels 31/29/27/13, widths 128/256/512/1024, depths 2/2/18/2,
stem 224 -> 56); smaller settings make digits- or CPU-sized variants.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["LargeKernelNet", "large_kernel_net"]


def _bn_act(channels: int) -> list[nn.Module]:
    return [nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]


class LargeKernelBlock(nn.Module):
    """``x + pw2(relu(bn(dw(relu(pw1(norm(x)))))))`` with a depthwise ``k x k`` ``dw``."""

    def __init__(self, channels: int, kernel: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels)
        self.pw1 = nn.Conv2d(channels, channels, 1)
        self.act1 = nn.ReLU(inplace=True)
        self.dw = nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=channels)
        self.bn = nn.BatchNorm2d(channels)
        self.act2 = nn.ReLU(inplace=True)
        self.pw2 = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act1(self.pw1(self.norm(x)))
        h = self.act2(self.bn(self.dw(h)))
        return x + self.pw2(h)


class ConvFFN(nn.Module):
    """``x + pw2(gelu(pw1(bn(x))))`` with ``ffn_ratio`` expansion."""

    def __init__(self, channels: int, ratio: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels)
        self.pw1 = nn.Conv2d(channels, channels * ratio, 1)
        self.act = nn.GELU()
        self.pw2 = nn.Conv2d(channels * ratio, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.pw2(self.act(self.pw1(self.norm(x))))


class _Block(nn.Module):
    """One stage block: a large-kernel block then a ConvFFN (``.lk``, ``.ffn``)."""

    def __init__(self, channels: int, kernel: int, ffn_ratio: int) -> None:
        super().__init__()
        self.lk = LargeKernelBlock(channels, kernel)
        self.ffn = ConvFFN(channels, ffn_ratio)

    def forward(self, x: Tensor) -> Tensor:
        return self.ffn(self.lk(x))


class _Stage(nn.Sequential):
    def __init__(self, channels: int, depth: int, kernel: int, ffn_ratio: int) -> None:
        super().__init__(*(_Block(channels, kernel, ffn_ratio) for _ in range(depth)))


class LargeKernelNet(nn.Module):
    """See the module docstring for the layout.

    Args:
        num_classes: output logits.
        in_channels: input channels.
        stem_kernel: side of the first (dense, stride 2) convolution.
        widths: channels per stage.
        depths: blocks per stage.
        dw_kernels: depthwise kernel side per stage (odd, padding ``k // 2``).
        ffn_ratio: ConvFFN expansion.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        in_channels: int = 3,
        stem_kernel: int = 11,
        widths: Sequence[int] = (128, 256, 512, 1024),
        depths: Sequence[int] = (2, 2, 18, 2),
        dw_kernels: Sequence[int] = (31, 29, 27, 13),
        ffn_ratio: int = 4,
    ) -> None:
        super().__init__()
        widths, depths, dw_kernels = list(widths), list(depths), list(dw_kernels)
        if not (len(widths) == len(depths) == len(dw_kernels) >= 1):
            raise ValueError(
                f"LargeKernelNet: widths {widths}, depths {depths} and dw_kernels {dw_kernels} need one entry per stage"
            )
        for name, values in (("widths", widths), ("depths", depths), ("dw_kernels", dw_kernels)):
            if any(int(v) < 1 for v in values):
                raise ValueError(f"LargeKernelNet: {name}={values} must be positive")
        if any(k % 2 == 0 for k in dw_kernels) or stem_kernel % 2 == 0 or stem_kernel < 1:
            raise ValueError(
                f"LargeKernelNet: kernels must be odd, got stem_kernel={stem_kernel}, dw_kernels={dw_kernels}"
            )
        if ffn_ratio < 1:
            raise ValueError(f"LargeKernelNet: ffn_ratio={ffn_ratio} must be >= 1")
        w0 = widths[0]
        self.stem = nn.Sequential()
        self.stem.add_module(
            "conv1", nn.Conv2d(in_channels, w0, stem_kernel, stride=2, padding=stem_kernel // 2, bias=False)
        )
        self.stem.add_module("bn1", nn.BatchNorm2d(w0))
        self.stem.add_module("relu1", nn.ReLU(inplace=True))
        self.stem.add_module("conv2", nn.Conv2d(w0, w0, 3, stride=2, padding=1, groups=w0, bias=False))
        self.stem.add_module("bn2", nn.BatchNorm2d(w0))
        self.stem.add_module("relu2", nn.ReLU(inplace=True))
        self.stem.add_module("conv3", nn.Conv2d(w0, w0, 1, bias=False))
        self.stem.add_module("bn3", nn.BatchNorm2d(w0))
        self.stem.add_module("relu3", nn.ReLU(inplace=True))
        self.stages = nn.ModuleList(_Stage(w, d, k, ffn_ratio) for w, d, k in zip(widths, depths, dw_kernels))
        self.transitions = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(a, b, 1, bias=False),
                *_bn_act(b),
                nn.Conv2d(b, b, 3, stride=2, padding=1, groups=b, bias=False),
                *_bn_act(b),
            )
            for a, b in zip(widths[:-1], widths[1:])
        )
        self.head = nn.Sequential(
            nn.BatchNorm2d(widths[-1]),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(widths[-1], num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i < len(self.transitions):
                x = self.transitions[i](x)
        return self.head(x)

    def large_kernel_layers(self) -> list[str]:
        """Names (relative to this module) of the stem conv and the depthwise large-kernel convs."""
        return ["stem.conv1"] + [
            f"stages.{i}.{j}.lk.dw" for i, stage in enumerate(self.stages) for j in range(len(stage))
        ]


def large_kernel_net(
    num_classes: int = 1000,
    in_channels: int = 3,
    stem_kernel: int = 11,
    widths: Sequence[int] = (128, 256, 512, 1024),
    depths: Sequence[int] = (2, 2, 18, 2),
    dw_kernels: Sequence[int] = (31, 29, 27, 13),
    ffn_ratio: int = 4,
) -> LargeKernelNet:
    """Factory for :class:`LargeKernelNet` (Hydra ``_target_``)."""
    return LargeKernelNet(num_classes, in_channels, stem_kernel, widths, depths, dw_kernels, ffn_ratio)


if __name__ == "__main__":  # pragma: no cover
    net = large_kernel_net()
    print(sum(p.numel() for p in net.parameters()) / 1e6, "M parameters")
    print(net(torch.randn(1, 3, 224, 224)).shape)
