"""Force configs and recipes: conf/callbacks/force.yaml, recipes/wen2017/*, the strength sweeps
(Hydra grid, Optuna, W&B), and fast_dev_run smoke runs on a generated ImageFolder."""

from __future__ import annotations

import inspect
import itertools
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import yaml
from helpers import compose_cfg, make_image_folder, run_cli, run_train, seed_torch_hub
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf

from lightning_struct import ForceRegularization
from lightning_struct._resources import config_dir, recipes_dir

QUIET = ["callbacks.rich_progress_bar=null", "trainer.enable_progress_bar=false", "logger=none", "test=false"]

#: filled by ForceProbe instances that Hydra builds inside train() (keyed by tag)
SEEN: dict[str, dict[str, Any]] = {}


class ForceProbe(Callback):
    """Records what the run's ForceRegularization selected and how many steps it applied."""

    def __init__(self, tag: str) -> None:
        self.tag = tag

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        cb = next(c for c in trainer.callbacks if isinstance(c, ForceRegularization))
        SEEN[self.tag] = {
            "layers": [layer.name for layer in cb.layers],
            "step": cb.step,
            "strength": cb.strength_at(0),
            "history": list(cb.history),
        }


def _probe(tag: str) -> list[str]:
    return [f"+callbacks.forceprobe._target_={__name__}.ForceProbe", f"+callbacks.forceprobe.tag={tag}"]


# ------------------------------------------------------------------------------------------
# conf/callbacks/force.yaml
# ------------------------------------------------------------------------------------------
def test_callback_config_matches_the_constructor() -> None:
    node = OmegaConf.load(config_dir() / "callbacks" / "force.yaml")
    conf = OmegaConf.to_container(node.force)
    assert conf.pop("_target_") == "lightning_struct.ForceRegularization"
    params = inspect.signature(ForceRegularization.__init__).parameters
    assert set(conf) == set(params) - {"self"}, "force.yaml must list every argument"
    for key, value in conf.items():
        default = params[key].default
        if key == "strength":
            continue  # required argument; the config gives an example value
        if isinstance(default, tuple):
            default = list(default)
        assert value == default, (
            f"force.yaml {key}={value!r} differs from the constructor default {default!r}"
        )
    cb = instantiate(node.force)
    assert isinstance(cb, ForceRegularization) and cb.strength_at(0) == pytest.approx(1e-4)


def test_callback_config_added_to_defaults(tmp_path: Path) -> None:
    cfg = compose_cfg(
        ["callbacks=[default,force]", "callbacks.force.strength={kind:cosine,value:1e-3,total_steps:10}"],
        tmp_path,
    )
    cb = instantiate(cfg.callbacks.force)
    assert cb.strength_at(0) == pytest.approx(1e-3) and cb.strength_at(10) == 0.0
    assert "model_checkpoint" in cfg.callbacks


# ------------------------------------------------------------------------------------------
# recipes compose and carry what their headers say
# ------------------------------------------------------------------------------------------
RECIPES = {
    "wen2017/alexnet_force": {
        "strength": 5e-5,
        "kind": "l2",
        "lr": 1e-3,
        "net": "lightning_struct.models.torchvision_model",
    },
    "wen2017/resnet50_force": {
        "strength": 5e-5,
        "kind": "l2",
        "lr": 1e-3,
        "net": "lightning_struct.models.torchvision_model",
    },
    "wen2017/resnet20_cifar_force": {
        "strength": 1e-4,
        "kind": "l2",
        "lr": 0.1,
        "net": "lightning_struct.models.resnet_cifar.resnet20",
    },
    "wen2017/digits_force": {
        "strength": 1e-4,
        "kind": "l2",
        "lr": 2e-3,
        "net": "lightning_struct.models.digits_cnn",
    },
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_composes_with_force(recipe: str, tmp_path: Path) -> None:
    expected = RECIPES[recipe]
    cfg = compose_cfg([f"recipe={recipe}"], tmp_path)
    assert cfg.model.net._target_ == expected["net"]
    assert cfg.model.optimizer.lr == pytest.approx(expected["lr"])
    cb = instantiate(cfg.callbacks.force)
    assert isinstance(cb, ForceRegularization)
    assert cb.kind == expected["kind"] and cb.strength_at(0) == pytest.approx(expected["strength"])
    text = (recipes_dir() / f"{recipe}.yaml").read_text()
    assert "Wen" in text and "ICCV 2017" in text  # the header names the paper


def test_resnet20_model_config(tmp_path: Path) -> None:
    cfg = compose_cfg(["model=resnet20_cifar", "data.image_size=32", "data.in_channels=3"], tmp_path)
    model = instantiate(cfg.model)
    assert sum(p.numel() for p in model.parameters()) == 269_722
    assert cfg.model.scheduler._target_ == "torch.optim.lr_scheduler.MultiStepLR"


# ------------------------------------------------------------------------------------------
# smoke runs: fast_dev_run on a generated ImageFolder / digits
# ------------------------------------------------------------------------------------------
SMOKE = {
    # recipe: (image size, expected regularized layers)
    "wen2017/alexnet_force": (64, [f"net.features.{i}" for i in (0, 3, 6, 8, 10)]),
    "wen2017/resnet20_cifar_force": (32, None),
    "wen2017/resnet50_force": (32, None),
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    return {
        s: make_image_folder(tmp_path_factory.mktemp(f"img{s}"), n_classes=3, per_class=4, size=s)
        for s in (32, 64)
    }


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(SMOKE))
def test_recipe_fast_dev_run(recipe: str, folder: dict[int, Path], tmp_path: Path, monkeypatch) -> None:
    size, layers = SMOKE[recipe]
    pretrained = {"wen2017/alexnet_force": "alexnet", "wen2017/resnet50_force": "resnet50"}
    if recipe in pretrained:  # these recipes start from torchvision weights: a seeded hub cache stands in
        seed_torch_hub(monkeypatch, tmp_path, pretrained[recipe])
    tag = recipe.replace("/", "_")
    run_train(
        [
            f"recipe={recipe}",
            "trainer=cpu",
            "trainer.precision=32-true",
            "trainer.fast_dev_run=true",
            f"data.root={folder[size]}",
            f"data.image_size={size}",
            "data.batch_size=4",
            "data.num_workers=0",
            "data.persistent_workers=false",
            "data.pin_memory=false",
            "model.num_classes=3",
            *QUIET,
            *_probe(tag),
        ],
        tmp_path,
    )
    seen = SEEN[tag]
    assert seen["step"] == 1  # one optimizer step, one force application
    assert seen["history"] and "force/total_rank_fraction@0.95" in seen["history"][0]
    if layers is not None:
        assert seen["layers"] == layers
    else:  # every conv but the stem (option-A ResNet-20 has no projection convs)
        assert seen["layers"] and "net.conv1" not in seen["layers"] and "net.fc" not in seen["layers"]
        assert all(n.startswith("net.layer") for n in seen["layers"])
        n_convs = {"wen2017/resnet20_cifar_force": 18, "wen2017/resnet50_force": 52}[recipe]
        assert len(seen["layers"]) == n_convs


@pytest.mark.slow
def test_digits_recipe_fast_dev_run(tmp_path: Path) -> None:
    run_train(
        ["recipe=wen2017/digits_force", "trainer.fast_dev_run=true", *QUIET, *_probe("digits")], tmp_path
    )
    assert SEEN["digits"]["layers"] == [
        "net.features.conv2",
        "net.features.conv3",
        "net.classifier.fc1",
        "net.classifier.fc2",
    ]
    assert SEEN["digits"]["step"] == 1


# ------------------------------------------------------------------------------------------
# sweeps: Hydra grid, Optuna, W&B
# ------------------------------------------------------------------------------------------
def test_hydra_grid_sweep_recipe(tmp_path: Path) -> None:
    cfg = compose_cfg(["recipe=wen2017/sweep_strength"], tmp_path)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    grid = [float(v) for v in str(cfg.hydra.sweeper.params["callbacks.force.strength"]).split(",")]
    assert grid == [0.0, 3e-5, 1e-4, 3e-4, 1e-3]
    # it is the digits recipe underneath
    assert cfg.model.net._target_ == "lightning_struct.models.digits_cnn" and cfg.data.image_size == 8
    for value in grid:
        cb = instantiate(
            compose_cfg(
                ["recipe=wen2017/digits_force", f"callbacks.force.strength={value}"], tmp_path
            ).callbacks.force
        )
        assert cb.strength_at(0) == value


def test_optuna_config_composes(tmp_path: Path) -> None:
    cfg = compose_cfg(["recipe=wen2017/digits_force", "hparams_search=force_optuna"], tmp_path)
    assert cfg.optimized_metric == "val/acc_best"
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert sweeper.direction == "maximize" and sweeper.n_trials >= 2
    assert (
        "callbacks.force.strength" in sweeper.params and "log" in sweeper.params["callbacks.force.strength"]
    )


@pytest.mark.slow
def test_optuna_two_trials_fast_dev_run(tmp_path: Path) -> None:
    res = run_cli(
        [
            "train",
            "hparams_search=force_optuna",
            "recipe=wen2017/digits_force",
            "hydra.sweeper.n_trials=2",
            "trainer.fast_dev_run=true",
            *QUIET,
        ],
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    (sweep,) = (tmp_path / "logs").glob("*/multiruns/*")
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(results["best_params"]) == {"callbacks.force.strength", "callbacks.force.kind"}
    assert 0.0 <= results["best_value"] <= 1.0
    assert (sweep / "0").is_dir() and (sweep / "1").is_dir()


def test_wandb_sweep_yaml(tmp_path: Path) -> None:
    spec = yaml.safe_load((recipes_dir() / "wen2017" / "wandb_sweep_strength.yaml").read_text())
    assert spec["method"] == "grid"
    assert spec["metric"] == {"name": "val/acc_best", "goal": "maximize"}
    assert spec["command"] == ["${env}", "lightning-struct", "train", "${args_no_hyphens}"]
    params = spec["parameters"]
    assert params["callbacks.force.strength"]["values"][0] == 0.0
    # every grid point, written as the agent writes it (key=value), is a valid override list
    keys = sorted(params)
    choices = [params[k]["values"] if "values" in params[k] else [params[k]["value"]] for k in keys]
    points = list(itertools.product(*choices))
    assert len(points) == 10
    for point in points[:: len(points) - 1]:  # first and last
        overrides = [f"{k}={v}" for k, v in zip(keys, point)]
        cfg = compose_cfg(overrides, tmp_path)
        cb = instantiate(cfg.callbacks.force)
        assert cb.strength_at(0) == pytest.approx(float(dict(zip(keys, point))["callbacks.force.strength"]))
