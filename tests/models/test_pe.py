"""PE (tied) and ACDC model factories: shapes, which blocks are tied, parameter counts; recipe smoke runs."""

from __future__ import annotations

import pytest
import torch
import torchvision
from helpers import make_image_folder, run_train
from torch import nn
from torchvision.models.resnet import Bottleneck

from lightning_struct.models.acdc_alexnet import alexnet_acdc
from lightning_struct.models.pe import digits_bottleneck_cnn, resnet50_pe, vision_transformer, vit_pe
from lightning_struct.nn import ACDCStack, TiedBottleneck, TiedMLP


def _n(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_resnet50_pe_ties_identity_blocks_only() -> None:
    dense = torchvision.models.resnet50(weights=None)
    pe = resnet50_pe()
    staged = resnet50_pe(staged=True)
    assert (_n(dense), _n(pe), _n(staged)) == (25_557_032, 21_919_784, 19_675_176)  # as in the docstring
    for model in (pe, staged):
        for stage, n_blocks in zip((model.layer1, model.layer2, model.layer3, model.layer4), (3, 4, 6, 3)):
            assert type(stage[0]) is Bottleneck and stage[0].downsample is not None  # downsampling: dense
            assert all(isinstance(b, TiedBottleneck) for b in list(stage)[1:]) and len(stage) == n_blocks
    # staged: one W per stage
    assert staged.layer3[1].weight is staged.layer3[5].weight
    assert pe.layer3[1].weight is not pe.layer3[5].weight
    # saving = the expand weights of the 12 tied blocks
    assert _n(dense) - _n(pe) == 2 * 64 * 256 + 3 * 128 * 512 + 5 * 256 * 1024 + 2 * 512 * 2048
    y = pe(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 1000)


def test_vit_pe_ties_every_mlp() -> None:
    tiny = {"patch_size": 8, "num_layers": 2, "num_heads": 2, "hidden_dim": 32, "mlp_dim": 64}
    pe = vit_pe("s_16", image_size=32, num_classes=7, **tiny)
    dense = vision_transformer("s_16", image_size=32, num_classes=7, **tiny)
    assert all(isinstance(layer.mlp, TiedMLP) for layer in pe.encoder.layers)
    assert _n(dense) - _n(pe) == 2 * 32 * 64
    assert pe(torch.randn(3, 3, 32, 32)).shape == (3, 7)
    with pytest.raises(ValueError, match="variant='xl_99'; allowed: 'b_16'"):
        vit_pe("xl_99")
    with pytest.raises(ValueError, match="not divisible"):
        vit_pe("s_16", image_size=30)


def test_vit_s16_counts_match_docstring() -> None:
    assert _n(vision_transformer("s_16")) == 22_050_664
    assert _n(vit_pe("s_16")) == 14_972_776
    # b_16 analytically: 12 layers x 768 x 3072 saved; the dense b_16 is torchvision's vit_b_16
    assert 86_567_656 - 58_256_104 == 12 * 768 * 3072


def test_alexnet_acdc() -> None:
    m = alexnet_acdc(num_classes=5)
    assert isinstance(m.classifier[1], ACDCStack) and isinstance(m.classifier[4], ACDCStack)
    assert m.classifier[1].in_features == 9216 and m.classifier[1].out_features == 4096
    assert (
        m.classifier[1].n_factors == 12 and m.classifier[1].relu and m.classifier[1].permutations is not None
    )
    assert _n(m.classifier[1]) + _n(m.classifier[4]) == 12 * 4 * (9216 + 4096)
    assert not torch.equal(m.classifier[1].permutations[:, :10], m.classifier[4].permutations[:, :10])
    assert m(torch.randn(2, 3, 64, 64)).shape == (2, 5)
    assert _n(alexnet_acdc()) == 7_205_672


@pytest.mark.parametrize("staged", [False, True])
def test_digits_bottleneck_cnn(staged: bool) -> None:
    dense, tied = digits_bottleneck_cnn(False), digits_bottleneck_cnn(True, staged=staged)
    saved = 2 * (16 * 64 + 32 * 128) + (16 * 64 + 32 * 128 if staged else 0)
    assert _n(dense) - _n(tied) == saved
    assert isinstance(tied.down, Bottleneck) and isinstance(tied.stage1[0], TiedBottleneck)
    assert tied(torch.randn(4, 1, 16, 16)).shape == (4, 10)
    with pytest.raises(ValueError, match="divisible by 4"):
        digits_bottleneck_cnn(channels=(30, 64))


QUIET = ["callbacks.rich_progress_bar=null", "trainer.enable_progress_bar=false", "logger=csv", "test=false"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("recipe", "size", "extra"),
    [
        ("moczulski2016/caffenet_acdc", 64, ["model.net.n_factors=2"]),
        ("koyun2024/resnet50_pe", 32, ["model.net.staged=true"]),
        (
            "koyun2024/vit_pe",
            32,
            ["model.net.variant=ti_16", "+model.net.patch_size=16", "+model.net.num_layers=2"],
        ),
    ],
)
def test_recipe_fast_dev_run_on_image_folder(recipe: str, size: int, extra: list[str], tmp_path) -> None:
    root = make_image_folder(tmp_path / "imgs", n_classes=3, per_class=2, size=size)
    metrics = run_train(
        [
            f"recipe={recipe}",
            "trainer=cpu",
            "trainer.fast_dev_run=true",
            f"data.root={root}",
            f"data.image_size={size}",
            "data.batch_size=3",
            "data.num_workers=0",
            "data.persistent_workers=false",
            "data.pin_memory=false",
            "model.num_classes=3",
            *extra,
            *QUIET,
        ],
        tmp_path / "run",
    )
    assert "train/loss" in metrics and torch.isfinite(torch.as_tensor(float(metrics["train/loss"])))
