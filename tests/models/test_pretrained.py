"""Pretrained starts: torchvision weights by name (from the torch hub cache) and weights-only init_ckpt."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torchvision
from helpers import make_image_folder, run_train, seed_torch_hub
from torch import nn

import lightning_struct.models as models_pkg
from lightning_struct.models import ImageClassifier, digits_cnn, load_init_weights, torchvision_model
from lightning_struct.surgery import convert, save_converted

QUIET = ["callbacks.rich_progress_bar=null", "trainer.enable_progress_bar=false", "logger=none", "test=false"]


def _seed_hub(monkeypatch, tmp_path: Path, name: str, weights: str) -> dict[str, torch.Tensor]:
    return seed_torch_hub(monkeypatch, tmp_path, name, weights)


def test_torchvision_weights_come_from_the_hub_cache_and_the_head_is_replaced(monkeypatch, tmp_path):
    sd = _seed_hub(monkeypatch, tmp_path, "resnet18", "IMAGENET1K_V1")
    net = torchvision_model("resnet18", num_classes=3, weights="IMAGENET1K_V1")
    got = net.state_dict()
    for k, v in sd.items():
        if not k.startswith("fc."):
            torch.testing.assert_close(got[k], v, rtol=0, atol=0)
    assert net.fc.out_features == 3 and net.fc.in_features == 512
    same = torchvision_model("resnet18", num_classes=1000, weights="ResNet18_Weights.IMAGENET1K_V1")
    torch.testing.assert_close(same.fc.weight, sd["fc.weight"], rtol=0, atol=0)  # 1000 classes: head kept


def test_weights_errors_name_the_choices_and_the_cache_file(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        torchvision_model("resnet18", weights="IMAGENET21K")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))

    def offline(*a, **k):
        import urllib.error

        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(ValueError, match=r"hub/checkpoints/resnet18-f37072fd\.pth"):
        torchvision_model("resnet18", weights="IMAGENET1K_V1")


# --------------------------------------------------------------------------- init_ckpt
def _classifier(num_classes=10):
    torch.manual_seed(0)
    return ImageClassifier(digits_cnn(num_classes=num_classes, image_size=8), num_classes=num_classes)


def _equal(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)


def test_init_from_a_lightning_checkpoint_a_state_dict_and_a_converted_file(tmp_path):
    src = _classifier()
    torch.manual_seed(5)
    for p in src.parameters():
        p.data.normal_()
    # (a) a Lightning-style checkpoint of the LightningModule ("net." keys, DDP "module." prefixes too)
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}, "epoch": 3}, tmp_path / "a.ckpt")
    dst = _classifier()
    rep = load_init_weights(dst, tmp_path / "a.ckpt")
    _equal(dst, src)
    assert rep.target == "" and not rep.missing and not rep.converted
    # (b) a plain state dict of the bare net: loads into model.net
    torch.save(src.net.state_dict(), tmp_path / "b.pth")
    dst = _classifier()
    assert load_init_weights(dst, tmp_path / "b.pth").target == "net"
    _equal(dst, src)
    # (c) a converted (low-rank) file: the structure is rebuilt first
    low = copy.deepcopy(src)
    convert(low, "lowrank", rank=4, include=["net.classifier.fc2"])
    save_converted(low, tmp_path / "c.pt")
    dst = _classifier()
    rep = load_init_weights(dst, tmp_path / "c.pt")
    assert rep.converted and type(dst.net.classifier.fc2).__name__ == "LowRankLinear"
    _equal(dst, low)


def test_init_mismatch_lists_keys_and_non_strict_keeps_the_new_head(tmp_path):
    src = _classifier(10)
    torch.save(src.state_dict(), tmp_path / "ten.ckpt")
    dst = _classifier(3)
    with pytest.raises(ValueError, match=r"other shapes: net\.classifier\.fc3\.weight \(10, 256\) vs \(3, 256\).*init_strict=false"):
        load_init_weights(dst, tmp_path / "ten.ckpt")
    head = dst.net.classifier.fc3.weight.detach().clone()
    rep = load_init_weights(dst, tmp_path / "ten.ckpt", strict=False)
    assert rep.mismatched == ["net.classifier.fc3.weight", "net.classifier.fc3.bias"]
    torch.testing.assert_close(dst.net.classifier.fc3.weight, head)  # the new head stays as initialised
    torch.testing.assert_close(dst.net.features.conv1.weight, src.net.features.conv1.weight)
    with pytest.raises(ValueError, match="no key of the file matches"):
        torch.save({"foo": torch.zeros(2)}, tmp_path / "junk.pt")
        load_init_weights(dst, tmp_path / "junk.pt", strict=False)


# --------------------------------------------------------------------------- the ImageNet recipes
IMAGENET = {  # recipe: (torchvision name, image size)
    "wen2017/alexnet_force": ("alexnet", 64),
    "wen2017/resnet50_force": ("resnet50", 32),
    "wen2017/resnet50_lowrank": ("resnet50", 32),
}


def _smoke(recipe: str, root: Path, size: int, extra: list[str]) -> list[str]:
    return [
        f"recipe={recipe}", "trainer=cpu", "trainer.precision=32-true", "trainer.fast_dev_run=true",
        f"data.root={root}", f"data.image_size={size}", "data.batch_size=4", "data.num_workers=0",
        "data.persistent_workers=false", "data.pin_memory=false", "model.num_classes=3", *QUIET, *extra,
    ]  # fmt: skip


@pytest.fixture
def built(monkeypatch):
    """The state dict of every net the recipe's factory builds, taken before training touches it."""
    seen: list[dict[str, torch.Tensor]] = []
    real = models_pkg.torchvision_model

    def spy(*args, **kwargs):
        net = real(*args, **kwargs)
        seen.append(copy.deepcopy(net.state_dict()))
        return net

    monkeypatch.setattr(models_pkg, "torchvision_model", spy)
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["wen2017/alexnet_force", "wen2017/resnet50_force"])
def test_imagenet_recipe_starts_from_seeded_torchvision_weights(recipe, built, monkeypatch, tmp_path):
    name, size = IMAGENET[recipe]
    sd = _seed_hub(monkeypatch, tmp_path, name, "IMAGENET1K_V1")
    root = make_image_folder(tmp_path / "img", n_classes=3, per_class=4, size=size)
    run_train(_smoke(recipe, root, size, ["model.net.weights=IMAGENET1K_V1"]), tmp_path / "run")
    (got,) = built
    head = {k for k in sd if got[k].shape != sd[k].shape}
    assert head and all(k.startswith(("fc.", "classifier.6.")) for k in head)  # only the 3-class head is new
    for k in sd.keys() - head:
        torch.testing.assert_close(got[k], sd[k], rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["wen2017/resnet50_force", "wen2017/alexnet_force"])
def test_imagenet_recipe_starts_from_init_ckpt(recipe, tmp_path, monkeypatch):
    name, size = IMAGENET[recipe]
    torch.manual_seed(7)
    net = torchvision.models.get_model(name, weights=None, num_classes=3)
    torch.save(net.state_dict(), tmp_path / "start.pth")
    root = make_image_folder(tmp_path / "img", n_classes=3, per_class=4, size=size)
    loaded = []
    real = load_init_weights

    def spy(model, source, strict=True):
        rep = real(model, source, strict=strict)
        loaded.append((copy.deepcopy(model.net.state_dict()), rep))
        return rep

    monkeypatch.setattr("lightning_struct.models.init.load_init_weights", spy)
    run_train(_smoke(recipe, root, size, [f"init_ckpt={tmp_path / 'start.pth'}"]), tmp_path / "run")
    (state, rep), = loaded
    assert rep.target == "net" and not rep.missing and not rep.unexpected
    for k, v in net.state_dict().items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0)


@pytest.mark.slow
def test_alexnet_pipeline_fast_dev_run_from_seeded_weights_to_onnx(monkeypatch, tmp_path):
    """Pretrained start -> force phase -> conversion -> fine-tune -> test -> checked ONNX, in one run."""
    seed_torch_hub(monkeypatch, tmp_path, "alexnet")
    root = make_image_folder(tmp_path / "img", n_classes=3, per_class=4, size=64)
    args = _smoke("wen2017/alexnet_pipeline", root, 64, ["test=true", "conversion.energy=null", "conversion.ratio=0.25"])
    args.remove("test=false")
    metrics = run_train(args, tmp_path / "run")
    assert metrics["conversion/layers_converted"] == 5 and "test/acc" in metrics
    onnx = list((tmp_path / "run").rglob("export/model.onnx"))
    assert len(onnx) == 1


def test_pipeline_recipes_compose_with_the_authors_schedules(tmp_path):
    from helpers import compose_cfg

    cfg = compose_cfg(["recipe=wen2017/alexnet_pipeline", "data.root=/x"], tmp_path)
    assert cfg.model.net.weights == "IMAGENET1K_V1" and list(cfg.model.scheduler.milestones) == [30, 40, 44]
    assert list(cfg.conversion.finetune_scheduler.milestones) == [14, 28] and cfg.conversion.fit
    assert cfg.conversion.finetune_drop_callbacks == ["force"] and cfg.export.format == "onnx"
    cfg = compose_cfg(["recipe=wen2017/resnet50_pipeline", "data.root=/x"], tmp_path)
    assert cfg.model.net.weights == "IMAGENET1K_V1" and cfg.conversion.energy == 0.95
    cfg = compose_cfg(["recipe=wen2017/resnet20_cifar_force", "data.root=/x"], tmp_path)
    assert cfg.data.train_crop == "padded" and cfg.data.crop_padding == 4
