"""A training ``DataLoader`` that resumes mid-epoch on the exact next batch.

Lightning restores a checkpoint's loop counters, but a plain ``DataLoader`` restarts its epoch
from the first batch with a new shuffle (its ``RandomSampler`` draws from a generator whose state
is not saved), so a run resumed mid-epoch sees different batches than an uninterrupted one.

:class:`ResumableLoader` fixes both halves:

* :class:`EpochShuffleSampler` draws epoch ``e``'s permutation from ``seed + e`` alone (Lightning
  calls ``set_epoch`` before every epoch, as for ``DistributedSampler``), so every epoch's order
  is a function of the seed and the epoch number, not of what ran before;
* the loader has Lightning's ``state_dict``/``load_state_dict`` interface (the ``_Stateful``
  protocol the fit loop saves into checkpoints): it records how many batches of the current
  epoch it has handed out, and after a restore it skips exactly those, without loading them.

Under DDP Lightning replaces the sampler by a ``DistributedSampler`` (also seeded by epoch); the
loader then skips the consumed batches by drawing them, which is exact too, only slower.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["EpochShuffleSampler", "ResumableLoader"]


class EpochShuffleSampler(Sampler[int]):
    """Shuffles ``range(n)`` with a generator seeded by ``seed + epoch``; can start ``skip`` samples in."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n = int(n)
        self.seed = int(seed)
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=g)
        start, self.skip = self.skip, 0
        return iter(order[start:].tolist())

    def __len__(self) -> int:
        return self.n


class ResumableLoader(DataLoader):
    """``DataLoader(dataset, batch_size, shuffle=...)`` whose epoch order and position survive a checkpoint.

    With ``shuffle=True`` the sampler is an :class:`EpochShuffleSampler` seeded by ``seed``. Every
    other ``DataLoader`` argument passes through.
    """

    def __init__(self, dataset: Dataset, batch_size: int = 1, shuffle: bool = False, seed: int = 0, **kwargs: Any) -> None:
        # attributes named as the arguments: Lightning re-creates the loader from them when it
        # injects a DistributedSampler
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        if shuffle and kwargs.get("sampler") is None and kwargs.get("batch_sampler") is None:
            kwargs["sampler"] = EpochShuffleSampler(len(dataset), seed)  # type: ignore[arg-type]
        # a generator of its own: creating an iterator then draws no number from torch's global RNG
        kwargs.setdefault("generator", torch.Generator().manual_seed(self.seed))
        super().__init__(dataset, batch_size=batch_size, **kwargs)
        self._yielded = 0
        self._resume_at = 0

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        skip, self._resume_at = self._resume_at, 0
        sampler_skips = skip and isinstance(self.sampler, EpochShuffleSampler) and self.batch_size is not None
        if sampler_skips:
            self.sampler.skip = skip * int(self.batch_size)  # type: ignore[union-attr,arg-type]
        it = super().__iter__()
        return self._counted(it, 0 if sampler_skips else skip, skip)

    def _counted(self, it: Iterator[Any], drop: int, start: int) -> Iterator[Any]:
        self._yielded = start
        for i, batch in enumerate(it):
            if i < drop:  # a sampler that cannot skip: draw and drop the consumed batches
                continue
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        epoch = getattr(self.sampler, "epoch", 0)
        return {"epoch": int(epoch), "batches": int(self._yielded)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        batches = int(state.get("batches", 0))
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(int(state.get("epoch", 0)))  # type: ignore[union-attr]
        # a finished epoch restarts at the next one: nothing to skip
        self._resume_at = batches if 0 < batches < len(self) else 0
