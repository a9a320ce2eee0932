"""Taking a few batches from a loader without eating the training run's randomness.

Every callback that needs real inputs before (or between) training steps - calibration of a
conversion, the input sizes of the FFT autotuner, the dense phase's calibration in the two-phase
form - takes them here, so the rule is written once: the draw happens inside preserved RNG states
(torch CPU and CUDA, numpy, python), so shuffling, augmentation and dropout of the run itself see
exactly the random stream they would have seen without the draw.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Mapping
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

__all__ = ["first_loader", "preserved_rng", "take_batches", "train_loader_of"]


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore the torch (CPU and every initialised CUDA device), numpy and python RNG states afterwards."""
    py, npy = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def first_loader(loaders: Any, kind: type = object) -> Any:
    """The first loader (an instance of ``kind``) in a Lightning dataloader value: a loader, or
    dicts / lists / tuples of them, searched depth first; ``None`` when there is none."""
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)) and not (loaders and isinstance(loaders[0], torch.Tensor)):
        for item in loaders:
            found = first_loader(item, kind)
            if found is not None:
                return found
        return None
    return loaders if isinstance(loaders, kind) else None


def take_batches(loader: Any, n: int) -> list[Any]:
    """The first ``n`` batches of ``loader`` (fewer if it is shorter), drawn in a forked RNG state."""
    if loader is None or n <= 0:
        return []
    out: list[Any] = []
    with preserved_rng():
        for i, batch in enumerate(loader):
            if i >= n:
                break
            out.append(batch)
    return out


def train_loader_of(trainer: pl.Trainer | None, datamodule: pl.LightningDataModule | None = None) -> Any:
    """The training loader of a running ``trainer``, else a fresh one from ``datamodule`` (set up for fit)."""
    if trainer is not None and trainer.train_dataloader is not None:
        return first_loader(trainer.train_dataloader)
    if datamodule is None:
        return None
    datamodule.prepare_data()
    datamodule.setup("fit")
    return first_loader(datamodule.train_dataloader())
