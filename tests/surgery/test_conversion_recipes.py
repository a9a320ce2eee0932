"""Conversion configs and recipes: conf/conversion/*, conf/callbacks/conversion.yaml,
recipes/wen2017/*_lowrank.yaml (compose + fast_dev_run smoke runs on a generated ImageFolder)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
import torchvision
from helpers import compose_cfg, make_image_folder, run_train
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lightning_struct import StructuredConversion
from lightning_struct._resources import config_dir
from lightning_struct.app.two_phase import SECTION_KEYS
from lightning_struct.models import ImageClassifier

QUIET = ["callbacks.rich_progress_bar=null", "trainer.enable_progress_bar=false", "logger=none"]


def test_callback_config_matches_the_constructor() -> None:
    node = OmegaConf.load(config_dir() / "callbacks" / "conversion.yaml")
    conf = OmegaConf.to_container(node.conversion)
    assert conf.pop("_target_") == "lightning_struct.StructuredConversion"
    params = inspect.signature(StructuredConversion.__init__).parameters
    named = {k for k, p in params.items() if p.kind not in (p.VAR_KEYWORD,)} - {"self"}
    assert set(conf) == named, "conversion.yaml must list every named argument"
    cb = instantiate(node.conversion)
    assert isinstance(cb, StructuredConversion) and cb.method == "lowrank" and cb.at_epoch == 5


@pytest.mark.parametrize("name", ["lowrank", "acdc", "tied"])
def test_conversion_group_files_compose_with_known_keys(name: str, tmp_path: Path) -> None:
    cfg = compose_cfg(["recipe=quickstart", f"+conversion={name}"], tmp_path)
    keys = set(cfg.conversion.keys())
    assert keys <= set(SECTION_KEYS), keys - set(SECTION_KEYS)
    assert cfg.conversion.method == name


def test_lowrank_recipes_require_the_force_checkpoint(tmp_path: Path) -> None:
    for recipe in ("wen2017/alexnet_lowrank", "wen2017/resnet50_lowrank"):
        cfg = compose_cfg([f"recipe={recipe}", "data.root=/x", "conversion.init_ckpt=/y.ckpt"], tmp_path)
        assert cfg.conversion.energy == 0.95 and cfg.conversion.fit is False
    cfg = compose_cfg(["recipe=wen2017/alexnet_lowrank", "data.root=/x"], tmp_path)
    with pytest.raises(ValueError, match="conversion.init_ckpt"):
        run_train(["recipe=wen2017/alexnet_lowrank", "data.root=/x", *QUIET], tmp_path)
    assert OmegaConf.is_missing(cfg.conversion, "init_ckpt")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("img64"), n_classes=3, per_class=4, size=64)


IMAGE = ["trainer=cpu", "trainer.precision=32-true", "trainer.fast_dev_run=true", "data.image_size=64",
         "data.batch_size=4", "data.num_workers=0", "data.persistent_workers=false", "data.pin_memory=false",
         "model.num_classes=3"]  # fmt: skip


@pytest.mark.slow
def test_alexnet_lowrank_fast_dev_run_dense_phase_then_convert(folder: Path, tmp_path: Path) -> None:
    metrics = run_train(
        [
            "recipe=wen2017/alexnet_lowrank",
            f"data.root={folder}",
            *IMAGE,
            "conversion.fit=true",
            "conversion.init_ckpt=null",
            # random weights have flat spectra: a fixed ratio makes the smoke run convert something
            "conversion.energy=null",
            "conversion.ratio=0.25",
            *QUIET,
        ],
        tmp_path,
    )
    assert metrics["conversion/layers_converted"] == 5  # the five convs
    assert metrics["conversion/params_after"] < metrics["conversion/params_before"]
    assert "test/acc" in metrics and "dense/train/loss" in metrics


@pytest.mark.slow
def test_resnet50_lowrank_fast_dev_run_from_init_ckpt(folder: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    dense = ImageClassifier(torchvision.models.resnet50(num_classes=3), num_classes=3)
    ckpt = tmp_path / "force.ckpt"
    torch.save({"state_dict": dense.state_dict()}, ckpt)
    metrics = run_train(
        [
            "recipe=wen2017/resnet50_lowrank",
            f"data.root={folder}",
            *IMAGE,
            f"conversion.init_ckpt={ckpt}",
            *QUIET,
        ],
        tmp_path,
    )
    # fit=false: no dense phase; 52 convs selected (all but the stem), energy 0.95 on random
    # weights converts few of them, but the pipeline ran end to end
    assert not any(k.startswith("dense/") for k in metrics)
    assert metrics["conversion/params_before"] == sum(p.numel() for p in dense.parameters())
    assert "test/acc" in metrics


@pytest.mark.slow
def test_callback_form_in_the_cli_tests_the_best_converted_checkpoint(tmp_path: Path) -> None:
    metrics = run_train(
        [
            "recipe=quickstart",
            "callbacks=[default,conversion]",
            "callbacks.conversion.at_epoch=1",
            "callbacks.conversion.energy=null",
            "callbacks.conversion.rank=4",
            "trainer.max_epochs=2",
            "trainer.limit_train_batches=3",
            "trainer.limit_val_batches=2",
            "data.image_size=8",
            "test=true",
            *QUIET,
        ],
        tmp_path,
    )
    # the dense epoch may have the higher val/acc; "best" must still be a converted checkpoint,
    # otherwise test() would try to load dense weights into the converted model and fail
    assert "test/acc" in metrics
    best = sorted((tmp_path / "checkpoints").glob("epoch_*.ckpt"))
    ck = torch.load(best[-1], weights_only=True)
    assert "lightning_struct_conversion" in ck
