"""LightningDataModules: sklearn digits (ships with scikit-learn) and ImageNet-layout folders."""

from lightning_struct.data.digits import DigitsDataModule
from lightning_struct.data.imagefolder import ImageFolderDataModule
from lightning_struct.data.loader import EpochShuffleSampler, ResumableLoader

__all__ = ["DigitsDataModule", "EpochShuffleSampler", "ImageFolderDataModule", "ResumableLoader"]
