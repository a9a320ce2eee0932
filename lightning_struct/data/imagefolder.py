"""ImageNet-layout folders (``root/train/<class>/*``, ``root/val/<class>/*``) as a DataModule."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from lightning_struct._checks import check_choice, check_int, check_number
from lightning_struct.data.loader import ResumableLoader

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _check_split(root: Path, split: str) -> list[str]:
    """Class folder names of ``root/split``; raises naming the path when missing or empty."""
    path = root / split
    if not path.is_dir():
        raise FileNotFoundError(
            f"ImageFolderDataModule: data.root={str(root)!r} has no '{split}/' folder (expected {path}/<class>/<images>)"
        )
    classes = sorted(d.name for d in path.iterdir() if d.is_dir())
    if not classes:
        raise FileNotFoundError(f"ImageFolderDataModule: {path} contains no class folders")
    has_images = any(
        f.suffix.lower() in _IMG_EXTENSIONS for c in classes for f in (path / c).iterdir() if f.is_file()
    )
    if not has_images:
        raise FileNotFoundError(f"ImageFolderDataModule: {path} has class folders but no images ({', '.join(_IMG_EXTENSIONS)})")
    return classes


class ImageFolderDataModule(pl.LightningDataModule):
    """ImageNet-style data with the standard torchvision train/val transforms.

    Train: ``RandomResizedCrop(image_size)`` + horizontal flip (ImageNet), or with
    ``train_crop="padded"`` the CIFAR recipe: ``RandomCrop(image_size, padding=crop_padding)`` of
    the image resized to ``image_size``, + flip; val/test:
    ``Resize(round(image_size / crop_ratio))`` + ``CenterCrop(image_size)``; both normalized with the
    ImageNet mean/std. The test split is ``val/`` unless ``root/test`` exists.

    Args:
        root: dataset root holding ``train/`` and ``val/``.
        image_size: crop side in pixels (224 for ImageNet).
        crop_ratio: center-crop ratio for evaluation (0.875 is the classic 224/256).
        batch_size: samples per batch (per process under DDP).
        num_workers: DataLoader worker processes.
        pin_memory: pin host memory for faster host-to-GPU copies.
        persistent_workers: keep workers alive between epochs (only with ``num_workers > 0``).
        num_classes: expected number of classes; checked against the folders when given (in the
            Hydra config it follows ``model.num_classes``, the key to set).
        seed: seed of the training shuffle (epoch ``e`` uses ``seed + e``; resumes mid-epoch exactly).
        train_crop: ``"random_resized"`` (default) or ``"padded"`` (zero-pad ``crop_padding`` pixels,
            random crop back to ``image_size``: He et al.'s CIFAR augmentation).
        crop_padding: the padding of ``train_crop="padded"`` (4 for CIFAR).
    """

    def __init__(
        self,
        root: str | Path,
        image_size: int = 224,
        crop_ratio: float = 0.875,
        batch_size: int = 64,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        num_classes: int | None = None,
        seed: int = 0,
        train_crop: str = "random_resized",
        crop_padding: int = 4,
    ) -> None:
        super().__init__()
        if root is None or str(root) in ("", "???"):
            raise ValueError("ImageFolderDataModule: data.root is not set; pass data.root=/path/to/imagenet")
        where = "ImageFolderDataModule"
        check_int(image_size, "data.image_size", where, minimum=8)
        check_number(crop_ratio, "data.crop_ratio", where, minimum=0, open_min=True, maximum=1)
        check_choice(train_crop, "data.train_crop", ("random_resized", "padded"), where)
        check_int(crop_padding, "data.crop_padding", where, minimum=0)
        self.train_crop, self.crop_padding = train_crop, int(crop_padding)
        self.save_hyperparameters()
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"ImageFolderDataModule: data.root={str(self.root)!r} does not exist")
        self.classes = _check_split(self.root, "train")
        val_classes = _check_split(self.root, "val")
        if val_classes != self.classes:
            raise ValueError(
                f"ImageFolderDataModule: train/ and val/ of {self.root} have different class folders "
                f"({len(self.classes)} vs {len(val_classes)})"
            )
        if num_classes is not None and num_classes != len(self.classes):
            raise ValueError(
                f"ImageFolderDataModule: {self.root}/train has {len(self.classes)} class folders but the model "
                f"expects {num_classes} classes: pass model.num_classes={len(self.classes)} (data.num_classes follows it)"
            )
        self.num_classes = len(self.classes)
        self.image_size = image_size
        self.crop_ratio = crop_ratio
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.seed = int(seed)
        self._sets: dict[str, object] = {}

    def _transform(self, train: bool):  # noqa: ANN202 - torchvision transform
        from torchvision import transforms as T

        norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        if train and self.train_crop == "padded":
            crop = [T.Resize(self.image_size), T.RandomCrop(self.image_size, padding=self.crop_padding)]
            return T.Compose([*crop, T.RandomHorizontalFlip(), T.ToTensor(), norm])
        if train:
            return T.Compose([T.RandomResizedCrop(self.image_size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
        resize = int(round(self.image_size / self.crop_ratio))
        return T.Compose([T.Resize(resize), T.CenterCrop(self.image_size), T.ToTensor(), norm])

    def setup(self, stage: str | None = None) -> None:
        from torchvision.datasets import ImageFolder

        if "train" not in self._sets:
            self._sets["train"] = ImageFolder(str(self.root / "train"), transform=self._transform(True))
            self._sets["val"] = ImageFolder(str(self.root / "val"), transform=self._transform(False))
            test_dir = self.root / "test" if (self.root / "test").is_dir() else self.root / "val"
            self._sets["test"] = ImageFolder(str(test_dir), transform=self._transform(False))

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(channels, height, width)`` of one sample."""
        return (3, self.image_size, self.image_size)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        return ResumableLoader(
            self._sets[split],  # type: ignore[arg-type]
            batch_size=self.batch_size,
            shuffle=shuffle,
            seed=self.seed,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            drop_last=shuffle and len(self._sets[split]) > self.batch_size,  # type: ignore[arg-type]
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
