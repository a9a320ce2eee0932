"""scikit-learn's handwritten digits (1,797 images of 8x8 pixels, 10 classes) as a DataModule.

The data ships inside scikit-learn, so nothing is downloaded. Images are resized (bilinear)
to ``image_size``, scaled to [0, 1] and normalized with the training split's mean and std.
The train/val/test split is stratified and fixed by ``seed``.
"""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_struct._checks import check_choice, check_int
from lightning_struct.data.loader import ResumableLoader


class DigitsDataModule(pl.LightningDataModule):
    """The sklearn digits as tensors ``(N, in_channels, image_size, image_size)``.

    Args:
        batch_size: samples per batch for every split.
        image_size: side of the square images after bilinear resizing (8 keeps the original).
        in_channels: 1 (grey) or 3 (grey repeated, for ImageNet-style networks).
        val_fraction: fraction of the 1,797 samples held out for validation.
        test_fraction: fraction held out for testing.
        seed: seed of the stratified split (the same seed always gives the same split).
        num_workers: DataLoader workers (0 is fastest for this tiny in-memory set).
        pin_memory: pin host memory (useful with a GPU).
    """

    num_classes: int = 10

    def __init__(
        self,
        batch_size: int = 64,
        image_size: int = 16,
        in_channels: int = 1,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        where = "DigitsDataModule"
        check_int(batch_size, "data.batch_size", where, minimum=1)
        check_int(image_size, "data.image_size", where, minimum=4)  # pixels
        check_choice(in_channels, "data.in_channels", (1, 3), where)
        if not (0 < val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(
                f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} must be in (0, 1) "
                "and sum to less than 1"
            )
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.image_size = image_size
        self.in_channels = in_channels
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def _split_indices(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stratified split: per class, a seeded permutation cut into test / val / train."""
        rng = np.random.default_rng(self.seed)
        train, val, test = [], [], []
        for c in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == c))
            n_test = int(round(self.test_fraction * len(idx)))
            n_val = int(round(self.val_fraction * len(idx)))
            test.append(idx[:n_test])
            val.append(idx[n_test : n_test + n_val])
            train.append(idx[n_test + n_val :])
        return (np.sort(np.concatenate(train)), np.sort(np.concatenate(val)), np.sort(np.concatenate(test)))

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
        y = torch.tensor(digits.target, dtype=torch.long)
        if self.image_size != 8:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        tr, va, te = self._split_indices(digits.target)
        mean, std = x[tr].mean(), x[tr].std()
        x = (x - mean) / std
        if self.in_channels == 3:
            x = x.expand(-1, 3, -1, -1).contiguous()
        self.train_set = TensorDataset(x[tr], y[tr])
        self.val_set = TensorDataset(x[va], y[va])
        self.test_set = TensorDataset(x[te], y[te])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(channels, height, width)`` of one sample."""
        return (self.in_channels, self.image_size, self.image_size)

    def _loader(self, ds: TensorDataset | None, shuffle: bool) -> DataLoader:
        assert ds is not None, "setup() must run first"
        # the training loader's order depends on (seed, epoch) only and resumes mid-epoch exactly
        return ResumableLoader(
            ds,
            batch_size=self.batch_size,
            shuffle=shuffle,
            seed=self.seed,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
