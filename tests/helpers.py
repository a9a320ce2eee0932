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

    import lightning_struct.app.train as train_mod
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
    """Compose and run :func:`lightning_struct.app.train.train` in-process; returns its metrics."""
    from lightning_struct.app.train import train

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


# ----------------------------------------------------------------------------------------------
# one tiny conv classifier, random data and a quiet Trainer (shared by the callback tests)
# ----------------------------------------------------------------------------------------------
import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402


class TinyCNN(pl.LightningModule):
    """A tiny conv classifier: cross-entropy, SGD with momentum.

    ``self.net`` is ``net`` when given (a test that needs particular layers passes its own; they
    are then named ``net.<name>``), else one ``kernel_size`` conv + ReLU per entry of
    ``channels``, a global average pool and a ``Linear(channels[-1], classes)`` head.
    ``training_step`` / ``validation_step`` / ``test_step`` log ``train/loss`` / ``val/loss`` /
    ``test/loss``; ``predict_step`` returns the logits. Input ``(B, in_channels, H, W)``, batches
    ``(x, y)`` as :func:`tiny_loader` yields them.
    """

    def __init__(
        self,
        channels: Sequence[int] = (4, 8),
        in_channels: int = 1,
        classes: int = 3,
        kernel_size: int = 3,
        lr: float = 0.05,
        momentum: float = 0.9,
        net: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if net is None:
            layers: list[nn.Module] = []
            c_in = in_channels
            for c in channels:
                layers += [nn.Conv2d(c_in, c, kernel_size, padding=kernel_size // 2), nn.ReLU()]
                c_in = c
            net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, classes))
        self.net = net
        self.lr = lr
        self.momentum = momentum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("val/loss", self._loss(batch))

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("test/loss", self._loss(batch))

    def predict_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


def tiny_loader(
    n: int = 32,
    size: int = 8,
    classes: int = 3,
    seed: int = 0,
    channels: int = 1,
    batch_size: int = 8,
    shuffle: bool = False,
) -> DataLoader:
    """``n`` random ``(channels, size, size)`` images (standard normal) with random labels in
    ``[0, classes)``, from a private generator seeded with ``seed`` (the global RNG is untouched)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size, size, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


def quiet_trainer(
    tmp_path: str | Path | None = None,
    callbacks: Sequence[pl.Callback] = (),
    *,
    logger: bool | pl.loggers.Logger | Sequence[pl.loggers.Logger] = False,
    enable_checkpointing: bool = False,
    **kwargs: object,
) -> pl.Trainer:
    """A CPU ``Trainer`` that prints nothing: no progress bar, no model summary, no sanity
    validation, no logger and no checkpointing unless asked, one epoch, deterministic; ``tmp_path``
    (when given) is the ``default_root_dir`` for whatever is written. ``kwargs`` override any of
    these (e.g. ``max_steps``, ``precision``, ``strategy``, ``accelerator``).

    ``deterministic="warn"``: deterministic kernels wherever torch has one; an op without one
    (e.g. ``NLLLoss`` on CUDA, so cross-entropy in a GPU test) warns instead of raising. Like any
    deterministic Trainer this sets torch's process-wide ``use_deterministic_algorithms`` flag.
    """
    options: dict[str, object] = dict(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic="warn",
    )
    if tmp_path is not None:
        options["default_root_dir"] = str(tmp_path)
    options.update(kwargs)
    return pl.Trainer(
        callbacks=list(callbacks), logger=logger, enable_checkpointing=enable_checkpointing, **options
    )


def seed_torch_hub(monkeypatch, root: str | Path, name: str, weights: str = "IMAGENET1K_V1", seed: int = 123):
    """Write a random state dict of torchvision ``name`` where torch hub looks for ``weights``.

    ``TORCH_HOME`` points at ``root`` for the test, so a recipe asking for pretrained weights
    loads this file (nothing is downloaded). Returns the state dict written.
    """
    import torch
    import torchvision

    from lightning_struct.models.factories import hub_cache_file

    monkeypatch.setenv("TORCH_HOME", str(Path(root) / "torch_home"))
    entry = torchvision.models.get_model_weights(name)[weights]
    torch.manual_seed(seed)
    sd = torchvision.models.get_model(name, weights=None).state_dict()
    path = Path(hub_cache_file(entry))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)
    return sd
