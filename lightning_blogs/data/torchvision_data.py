"""MNIST and CIFAR-10 data modules over ``torchvision.datasets`` (for users who can download).

Nothing is downloaded unless ``download=True`` is passed. Without it, missing files raise a
:class:`FileNotFoundError` from :meth:`~TorchvisionDataModule.prepare_data` /
:meth:`~TorchvisionDataModule.setup`, i.e. before any training starts.
"""

from __future__ import annotations

import os
from typing import ClassVar

import torch
from torch.utils.data import Dataset, random_split
from torchvision import datasets, transforms
from torchvision.datasets import VisionDataset

from lightning_blogs._validation import check_int, check_non_negative_int
from lightning_blogs.data.base import SplitDataModule

__all__ = ["CIFAR10DataModule", "MNISTDataModule", "TorchvisionDataModule", "mnist_available"]


class TorchvisionDataModule(SplitDataModule):
    """Base for a torchvision classification data set with a fixed train/test split.

    ``val_size`` examples of the official training set are held out for validation with a
    ``torch.Generator`` seeded by ``split_seed`` (same seed, same split); the official test
    set is the test split. Images become ``float32`` tensors of shape
    ``(num_channels, image_size, image_size)``, scaled to [0, 1] and then normalised per
    channel with the class's fixed ``normalize_mean`` / ``normalize_std``. Labels are
    ``int64`` (after collation).

    Subclasses set ``dataset_cls`` (a torchvision dataset taking ``root, train, transform,
    download``), ``folder`` (where it keeps its files, relative to ``data_dir``),
    ``normalize_mean`` / ``normalize_std`` and ``num_channels`` / ``image_size`` /
    ``num_classes``.

    Args:
        data_dir: directory that holds (or will receive) the data set's files.
        batch_size: examples per batch, >= 1 (all three loaders).
        val_size: training examples held out for validation, >= 0 and smaller than the
            training set (0 gives an empty validation set).
        download: whether :meth:`prepare_data` may download the files (needs internet).
        num_workers: ``DataLoader`` worker processes, >= 0 (0 loads in the main process).
        split_seed: seed of the train/validation split (any integer).
    """

    dataset_cls: ClassVar[type[VisionDataset]]
    folder: ClassVar[str]
    normalize_mean: ClassVar[tuple[float, ...]]
    normalize_std: ClassVar[tuple[float, ...]]

    def __init__(
        self,
        data_dir: str | os.PathLike[str] = "data",
        batch_size: int = 64,
        val_size: int = 5000,
        download: bool = False,
        num_workers: int = 0,
        split_seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        if not isinstance(data_dir, (str, os.PathLike)):
            raise ValueError(f"data_dir must be a path (str or os.PathLike), got {data_dir!r}")
        self.data_dir = os.path.expanduser(os.fspath(data_dir))
        self.val_size = check_non_negative_int("val_size", val_size)
        if not isinstance(download, bool):
            raise ValueError(f"download must be True or False, got {download!r}")
        self.download = download
        self.split_seed = check_int("split_seed", split_seed)
        self.save_hyperparameters()

    @classmethod
    def dataset_name(cls) -> str:
        """The data set's name, e.g. ``"MNIST"``."""
        return cls.dataset_cls.__name__

    @classmethod
    def available(cls, data_dir: str | os.PathLike[str] = "data") -> bool:
        """Whether both splits can be loaded from ``data_dir`` without downloading."""
        root = os.path.expanduser(os.fspath(data_dir))
        try:
            for train in (True, False):
                cls.dataset_cls(root, train=train, download=False)
        except RuntimeError:  # torchvision's "Dataset not found (or corrupted)"
            return False
        return True

    def transform(self) -> transforms.Compose:
        """PIL image -> float tensor in [0, 1] -> per-channel normalisation."""
        return transforms.Compose(
            [transforms.ToTensor(), transforms.Normalize(self.normalize_mean, self.normalize_std)]
        )

    def _missing_message(self) -> str:
        where = os.path.join(self.data_dir, self.folder)
        return (
            f"{self.dataset_name()} data not found (or corrupted) under data_dir={self.data_dir!r} "
            f"(expected its files in {where!r}). Pass download=True to download it, or point "
            "data_dir at a directory that already holds it."
        )

    def prepare_data(self) -> None:
        """Download both splits if ``download=True``; otherwise fail early if they are missing.

        Raises:
            FileNotFoundError: the files are not under ``data_dir`` and ``download`` is False.
        """
        if self.download:
            for train in (True, False):
                self.dataset_cls(self.data_dir, train=train, download=True)
        elif not self.available(self.data_dir):
            raise FileNotFoundError(self._missing_message())

    def _load(self, *, train: bool) -> Dataset:
        try:
            return self.dataset_cls(self.data_dir, train=train, transform=self.transform(), download=False)
        except RuntimeError as err:
            raise FileNotFoundError(self._missing_message()) from err

    def setup(self, stage: str | None = None) -> None:
        """Build the splits ``stage`` needs (train/val for fit/validate, test for test/predict).

        Raises:
            FileNotFoundError: the files are not under ``data_dir`` (``download`` never
                happens here; it is :meth:`prepare_data`'s job).
            ValueError: ``val_size`` is not smaller than the official training set.
        """
        if stage in (None, "fit", "validate") and self.train_set is None:
            full = self._load(train=True)
            n = len(full)  # type: ignore[arg-type]
            if self.val_size >= n:
                raise ValueError(
                    f"val_size must be smaller than the {self.dataset_name()} training set "
                    f"({n} examples), got {self.val_size}"
                )
            generator = torch.Generator().manual_seed(self.split_seed)
            self.train_set, self.val_set = random_split(full, [n - self.val_size, self.val_size], generator=generator)
        if stage in (None, "test", "predict") and self.test_set is None:
            self.test_set = self._load(train=False)


class MNISTDataModule(TorchvisionDataModule):
    """MNIST: 60000 train / 10000 test greyscale 28x28 handwritten digits, 10 classes.

    Files live in ``<data_dir>/MNIST/raw/``. Normalised with mean 0.1307, std 0.3081.
    See :class:`TorchvisionDataModule` for the arguments.
    """

    dataset_cls: ClassVar[type[VisionDataset]] = datasets.MNIST
    folder: ClassVar[str] = os.path.join("MNIST", "raw")
    normalize_mean: ClassVar[tuple[float, ...]] = (0.1307,)
    normalize_std: ClassVar[tuple[float, ...]] = (0.3081,)
    num_channels: ClassVar[int] = 1
    image_size: ClassVar[int] = 28
    num_classes: ClassVar[int] = 10


class CIFAR10DataModule(TorchvisionDataModule):
    """CIFAR-10: 50000 train / 10000 test RGB 32x32 images, 10 classes.

    Files live in ``<data_dir>/cifar-10-batches-py/``. Normalised per channel (R, G, B) with
    the training set's pixel means (0.4914, 0.4822, 0.4465) and standard deviations
    (0.2470, 0.2435, 0.2616). See :class:`TorchvisionDataModule` for the arguments.
    """

    dataset_cls: ClassVar[type[VisionDataset]] = datasets.CIFAR10
    folder: ClassVar[str] = "cifar-10-batches-py"
    normalize_mean: ClassVar[tuple[float, ...]] = (0.4914, 0.4822, 0.4465)
    normalize_std: ClassVar[tuple[float, ...]] = (0.2470, 0.2435, 0.2616)
    num_channels: ClassVar[int] = 3
    image_size: ClassVar[int] = 32
    num_classes: ClassVar[int] = 10


def mnist_available(data_dir: str | os.PathLike[str] = "data") -> bool:
    """Whether MNIST (both splits) can be loaded from ``data_dir`` without downloading.

    Examples use it to fall back to :class:`~lightning_blogs.data.DigitsDataModule` offline.
    """
    return MNISTDataModule.available(data_dir)
