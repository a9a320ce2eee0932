"""Every config group option and every recipe composes and instantiates (Hydra compose API)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import compose_cfg, make_image_folder, seed_torch_hub
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig

from lightning_struct._resources import config_dir
from lightning_struct.app.train import register_recipes

CONF = config_dir()
GROUPS = ["data", "model", "callbacks", "logger", "trainer", "paths"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _recipes() -> list[str]:
    return sorted(register_recipes())


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("imgs"), n_classes=3, per_class=2, size=32)


def _needs_gpu(cfg: DictConfig) -> bool:
    return cfg.trainer.get("accelerator") in ("gpu", "cuda") and not torch.cuda.is_available()


def _instantiate_all(cfg: DictConfig, tmp_path: Path) -> None:
    keys = set(cfg.data.keys())  # `in` is False for a mandatory (???) value; keys() lists it
    if "root" in keys:
        cfg.data.root = str(tmp_path)
        cfg.data.num_workers = 0
        cfg.model.num_classes = 3
    dm = instantiate(cfg.data)
    assert hasattr(dm, "train_dataloader")
    model = instantiate(cfg.model)
    assert isinstance(model, torch.nn.Module)
    for cb in (cfg.get("callbacks") or {}).values():
        if cb is not None:
            instantiate(cb)
    for name, lg in (cfg.get("logger") or {}).items():
        assert get_class(lg._target_) is not None, name
    if _needs_gpu(cfg):
        assert get_class(cfg.trainer._target_) is not None
    else:
        instantiate(cfg.trainer)


@pytest.mark.parametrize(
    "group,option", [(g, o) for g in GROUPS for o in _options(g)], ids=lambda v: str(v)
)
def test_group_option_composes_and_instantiates(group, option, tmp_path, image_root):
    overrides = [f"{group}={option}"]
    if group == "data" and option == "imagefolder":
        overrides.append(f"data.root={image_root}")
    cfg = compose_cfg(overrides, tmp_path)
    _instantiate_all(cfg, image_root)


@pytest.mark.parametrize("recipe", _recipes())
def test_recipe_composes_and_instantiates(recipe, tmp_path, image_root, monkeypatch):
    cfg = compose_cfg([f"recipe={recipe}"], tmp_path)
    assert cfg.task_name, recipe
    net = cfg.model.get("net") or {}
    if net.get("weights"):  # a pretrained start: a seeded torch hub cache stands in for the download
        seed_torch_hub(monkeypatch, tmp_path, net.get("name"), net.weights)
    _instantiate_all(cfg, image_root)


def test_quickstart_is_a_recipe():
    assert "quickstart" in _recipes()


def test_primary_config_defaults():
    cfg = compose_cfg([])
    assert cfg.data._target_.endswith("DigitsDataModule")
    assert "wandb" in cfg.logger
    assert set(cfg.callbacks) == {"model_checkpoint", "lr_monitor", "rich_progress_bar", "resumable"}


def test_nested_recipes_and_wandb_sweep_files():
    names = _recipes()
    assert "wen2017/resnet50_force" in names  # nested folders select as recipe=<folder>/<name>
    assert not any("wandb_sweep" in n for n in names), "W&B sweep specs are not Hydra recipes"
