"""Shared test helpers: compose the Hydra config, run a training job, make an ImageFolder."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, open_dict

REPO = Path(__file__).resolve().parents[1]


def compose_cfg(overrides: Sequence[str] = (), output_dir: str | Path | None = None) -> DictConfig:
    """Compose ``conf/config.yaml`` with ``overrides`` (recipes registered) as the CLI would.

    ``paths.output_dir`` points at ``output_dir`` (a temp dir) and the Hydra runtime config is
    installed, so ``${hydra:...}`` interpolations resolve exactly as in a real run.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    import lightning_struct.train as train_mod
    from lightning_struct._resources import config_dir

    train_mod.register_recipes()
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
            cfg.paths.log_dir = str(output_dir)
            cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    return cfg


def run_train(overrides: Sequence[str], output_dir: str | Path) -> dict[str, float]:
    """Compose and run :func:`lightning_struct.train.train` in-process; returns its metrics."""
    from lightning_struct.train import train

    cfg = compose_cfg(overrides, output_dir)
    return train(cfg)


def run_cli(args: Sequence[str], cwd: str | Path, timeout: float = 600, env: dict[str, str] | None = None):
    """Run the installed ``lightning-struct`` console command in a subprocess."""
    exe = Path(sys.executable).parent / "lightning-struct"
    full_env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", **(env or {})}
    return subprocess.run(
        [str(exe), *args], cwd=str(cwd), capture_output=True, text=True, timeout=timeout, env=full_env
    )


def make_image_folder(
    root: str | Path, n_classes: int = 3, per_class: int = 8, size: int = 48, splits: Sequence[str] = ("train", "val")
) -> Path:
    """Write a small ImageNet-layout folder of PNG crops of scikit-learn's sample images.

    Class ``c`` takes its crops from one region of one sample image (``china.jpg`` /
    ``flower.jpg``) so the classes are learnable; crops are ``size x size`` RGB PNGs.
    """
    from PIL import Image
    from sklearn.datasets import load_sample_images

    root = Path(root)
    images = load_sample_images().images  # two (427, 640, 3) uint8 arrays
    rng = np.random.default_rng(0)
    for split in splits:
        for c in range(n_classes):
            img = images[c % len(images)]
            h, w, _ = img.shape
            # each class owns a horizontal band of its image
            band = (c // len(images)) % 3
            y0, y1 = band * h // 3, (band + 1) * h // 3
            d = root / split / f"class_{c:02d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                side = int(min(size * 2, y1 - y0 - 1, w - 1))
                y = int(rng.integers(y0, max(y0 + 1, y1 - side)))
                x = int(rng.integers(0, w - side))
                crop = img[y : y + side, x : x + side]
                Image.fromarray(crop).resize((size, size)).save(d / f"{i:03d}.png")
    return root
