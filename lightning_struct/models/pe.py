"""Row/column-space sharing ("PE") models of Koyun & Toreyin 2024, built from scratch.

* :func:`resnet50_pe` - torchvision ResNet-50 with :class:`~lightning_struct.nn.tied.TiedBottleneck`
  wherever the block shape allows (optionally one shared ``W`` per stage);
* :func:`vit_pe` / :func:`vision_transformer` - torchvision ``VisionTransformer`` with
  :class:`~lightning_struct.nn.tied.TiedMLP` FFNs (or dense, for the baseline);
* :func:`digits_bottleneck_cnn` - a small bottleneck CNN for the digits evidence, tied or not.

Weights are never downloaded (``weights=None``); fresh tied blocks are initialised as described
in :mod:`lightning_struct.nn.tied`. Parameter counts quoted below are computed by
``sum(p.numel() for p in model.parameters())`` (shared parameters counted once).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from torch import nn

from lightning_struct._checks import check_choice
from lightning_struct.nn.tied import TiedBottleneck, TiedMLP

__all__ = [
    "VIT_VARIANTS",
    "digits_bottleneck_cnn",
    "resnet50_pe",
    "tie_resnet_blocks",
    "vision_transformer",
    "vit_pe",
]


def _tieable(block: nn.Module) -> bool:
    conv1, conv3 = getattr(block, "conv1", None), getattr(block, "conv3", None)
    return (
        isinstance(conv1, nn.Conv2d)
        and isinstance(conv3, nn.Conv2d)
        and conv1.in_channels == conv3.out_channels
        and getattr(block, "downsample", None) is None
    )


def tie_resnet_blocks(model: nn.Module, staged: bool = False, zero_init_residual: bool = False) -> list[str]:
    """Replace every identity-shaped bottleneck of a torchvision ResNet by a *fresh* tied block.

    For building PE models from scratch (weights are re-initialised; to keep trained weights use
    ``lightning_struct.surgery.convert(model, "tied")`` or ``TiedBottleneck.from_bottleneck``).
    Blocks whose input and output widths differ (the first, downsampling block of each stage,
    with its projection shortcut) are left untouched.

    Args:
        model: a torchvision ResNet with ``Bottleneck`` blocks in ``layer1..layer4``.
        staged: one ``W`` per stage, shared by all tied blocks of that stage.
        zero_init_residual: zero ``bn3.weight`` of the tied blocks.

    Returns:
        The names of the replaced blocks (e.g. ``["layer1.1", "layer1.2", ...]``).
    """
    replaced: list[str] = []
    for stage_name in ("layer1", "layer2", "layer3", "layer4"):
        stage = getattr(model, stage_name, None)
        if not isinstance(stage, nn.Sequential):
            raise ValueError(
                f"tie_resnet_blocks: model has no nn.Sequential {stage_name!r}; is it a torchvision ResNet?"
            )
        shared: nn.Parameter | None = None
        for i, block in enumerate(stage):
            if not _tieable(block):
                continue
            width = block.conv1.out_channels
            groups = block.conv2.groups
            planes = block.conv3.out_channels // TiedBottleneck.expansion
            base_width = width * 64 // (planes * groups)
            norm_layer = type(block.bn1)
            new = TiedBottleneck(
                block.conv1.in_channels,
                planes,
                groups=groups,
                base_width=base_width,
                dilation=block.conv2.dilation[0],
                norm_layer=norm_layer,
                zero_init_residual=zero_init_residual,
            )
            if new.conv1.weight.shape != block.conv1.weight.shape:  # pragma: no cover - defensive
                raise ValueError(f"tie_resnet_blocks: could not rebuild {stage_name}.{i} with its widths")
            if staged:
                if shared is None:
                    shared = new.weight
                else:
                    new.share_weight(shared)
            stage[i] = new
            replaced.append(f"{stage_name}.{i}")
    return replaced


def resnet50_pe(num_classes: int = 1000, staged: bool = False, zero_init_residual: bool = False) -> nn.Module:
    """ResNet50-PE: torchvision ResNet-50 (``weights=None``) with tied bottlenecks.

    The 12 identity-shaped bottlenecks (blocks 1.. of each stage: 2 + 3 + 5 + 2) become
    :class:`~lightning_struct.nn.tied.TiedBottleneck` (``conv3 = conv1^T``). The 4 downsampling
    blocks (first of each stage) stay dense and untied: their expand maps the hidden width to
    ``4 * planes`` channels while their reduce reads ``C_in != 4 * planes`` channels (64 -> 256,
    256 -> 512, 512 -> 1024, 1024 -> 2048), so ``W^T`` has the wrong shape, and their
    projection shortcut is kept as it is.

    Parameter counts (1000 classes; computed):

    =========================  ===========  =========================
    model                      parameters   saved vs dense
    =========================  ===========  =========================
    resnet50 (dense)           25,557,032
    resnet50_pe                21,919,784   3,637,248 (14.2%)
    resnet50_pe(staged=True)   19,675,176   5,881,856 (23.0%)
    =========================  ===========  =========================

    Args:
        num_classes: classifier outputs.
        staged: one shared ``W`` per stage (Koyun & Toreyin's staged sharing; our reading of
            the paper, see ``ALGORITHMS.md`` section 5).
        zero_init_residual: zero-init the last BN of every block (torchvision's option).
    """
    import torchvision

    model = torchvision.models.resnet50(
        weights=None, num_classes=num_classes, zero_init_residual=zero_init_residual
    )
    tie_resnet_blocks(model, staged=staged, zero_init_residual=zero_init_residual)
    return model


#: torchvision / DeiT ViT configurations: patch_size, num_layers, num_heads, hidden_dim, mlp_dim
VIT_VARIANTS: dict[str, dict[str, int]] = {
    "ti_16": {"patch_size": 16, "num_layers": 12, "num_heads": 3, "hidden_dim": 192, "mlp_dim": 768},
    "s_16": {"patch_size": 16, "num_layers": 12, "num_heads": 6, "hidden_dim": 384, "mlp_dim": 1536},
    "b_16": {"patch_size": 16, "num_layers": 12, "num_heads": 12, "hidden_dim": 768, "mlp_dim": 3072},
    "b_32": {"patch_size": 32, "num_layers": 12, "num_heads": 12, "hidden_dim": 768, "mlp_dim": 3072},
    "l_16": {"patch_size": 16, "num_layers": 24, "num_heads": 16, "hidden_dim": 1024, "mlp_dim": 4096},
}


def vision_transformer(
    variant: str = "b_16",
    image_size: int = 224,
    num_classes: int = 1000,
    tied: bool = False,
    **overrides: Any,
) -> nn.Module:
    """torchvision ``VisionTransformer`` by variant name, dense or with tied FFNs.

    Args:
        variant: one of :data:`VIT_VARIANTS` (``"b_16"`` = torchvision ``vit_b_16``; ``"s_16"``
            and ``"ti_16"`` are the DeiT-S/Ti shapes).
        image_size: input side (divisible by the patch size).
        num_classes: classifier outputs.
        tied: replace every encoder ``MLPBlock`` by a fresh :class:`~lightning_struct.nn.tied.TiedMLP`
            (same widths and dropout).
        **overrides: any ``VisionTransformer`` argument (``patch_size``, ``num_layers``,
            ``num_heads``, ``hidden_dim``, ``mlp_dim``, ``dropout``, ``attention_dropout``), e.g.
            for tiny test models.
    """
    from torchvision.models.vision_transformer import VisionTransformer

    check_choice(variant, "variant", sorted(VIT_VARIANTS), "vision_transformer")
    cfg: dict[str, Any] = {**VIT_VARIANTS[variant], **overrides}
    if image_size % int(cfg["patch_size"]):
        raise ValueError(
            f"vision_transformer: image_size={image_size} is not divisible by patch_size={cfg['patch_size']}"
        )
    model = VisionTransformer(image_size=image_size, num_classes=num_classes, **cfg)
    if tied:
        dropout = float(cfg.get("dropout", 0.0))
        for layer in model.encoder.layers:
            layer.mlp = TiedMLP(int(cfg["hidden_dim"]), int(cfg["mlp_dim"]), dropout=dropout)
    return model


def vit_pe(
    variant: str = "b_16", image_size: int = 224, num_classes: int = 1000, **overrides: Any
) -> nn.Module:
    """ViT-PE: torchvision ViT whose every FFN is ``W^T GELU(W x + b1) + b2`` (:class:`TiedMLP`).

    Attention is left untied (how the paper ties attention is unconfirmed). Parameter counts
    (224 px, 1000 classes; computed):

    =======  ===========  ===========  ====================
    variant  dense        PE           saved
    =======  ===========  ===========  ====================
    b_16     86,567,656   58,256,104   28,311,552 (32.7%)
    s_16     22,050,664   14,972,776    7,077,888 (32.1%)
    ti_16     5,717,416    3,947,944    1,769,472 (30.9%)
    =======  ===========  ===========  ====================
    """
    return vision_transformer(variant, image_size=image_size, num_classes=num_classes, tied=True, **overrides)


def digits_bottleneck_cnn(
    tied: bool = False,
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 16,
    channels: tuple[int, int] = (64, 128),
    blocks: int = 2,
    staged: bool = False,
    zero_init_residual: bool = True,
) -> nn.Module:
    """A two-stage bottleneck CNN for the digits data (the tied-vs-untied evidence model).

    Layout (``C1, C2 = channels``)::

        stem       3x3 conv in -> C1, BN, ReLU                       (image_size)
        stage1     ``blocks`` bottlenecks C1 -> C1/4 -> C1            (tied or dense)
        down       dense bottleneck C1 -> C2, stride 2, projection   (always dense: C_in != C_out)
        stage2     ``blocks`` bottlenecks C2 -> C2/4 -> C2            (tied or dense)
        head       global average pool, Linear(C2, num_classes)

    The dense and tied versions share everything except that every identity-shaped block's
    expand conv is ``W^T`` in the tied version (``staged=True``: one ``W`` per stage). With the
    defaults the tied model has ``2 * (16*64 + 32*128) = 10,240`` fewer parameters
    (``staged=True``: 5,120 more saved). ``image_size`` is accepted for config uniformity
    (the global pool makes the model size-agnostic).

    ``zero_init_residual`` (default on, for both versions) starts every block's last BN at
    zero, so every block starts as the identity. It matters more for tied blocks: at
    initialisation their residual branch ``W^T G(W x)`` is strongly correlated with ``x`` (it is
    ``W^T W x`` up to the middle), unlike an independent random expand conv. On digits (8 px,
    channels (64, 128), Adam 3e-3, 10 epochs, seeds 0/1/2) the tied-minus-untied test accuracy
    is -0.27/+0.28/0.00 points with it and -0.84/-0.55/-0.83 without it (8 epochs; -1.1 to
    -1.7 after 15 epochs).
    """
    from torchvision.models.resnet import Bottleneck

    c1, c2 = (int(c) for c in channels)
    if c1 % 4 or c2 % 4:
        raise ValueError(f"digits_bottleneck_cnn: channels must be divisible by 4, got {channels}")
    if blocks < 1:
        raise ValueError(f"digits_bottleneck_cnn: blocks must be >= 1, got {blocks}")

    def stage(c: int) -> list[nn.Module]:
        if not tied:
            return [Bottleneck(c, c // 4) for _ in range(blocks)]
        first = TiedBottleneck(c, c // 4)
        rest = [
            TiedBottleneck(c, c // 4, shared_weight=first.weight if staged else None)
            for _ in range(blocks - 1)
        ]
        return [first, *rest]

    down = Bottleneck(
        c1,
        c2 // 4,
        stride=2,
        downsample=nn.Sequential(nn.Conv2d(c1, c2, 1, stride=2, bias=False), nn.BatchNorm2d(c2)),
    )
    model = nn.Sequential(
        OrderedDict(
            stem=nn.Sequential(
                nn.Conv2d(in_channels, c1, 3, padding=1, bias=False),
                nn.BatchNorm2d(c1),
                nn.ReLU(inplace=True),
            ),
            stage1=nn.Sequential(*stage(c1)),
            down=down,
            stage2=nn.Sequential(*stage(c2)),
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(1),
            fc=nn.Linear(c2, num_classes),
        )
    )
    if zero_init_residual:
        for m in model.modules():
            if isinstance(m, (Bottleneck, TiedBottleneck)):
                nn.init.zeros_(m.bn3.weight)
    return model
