"""Lightning data modules: offline 8x8 digits (default), MNIST and CIFAR-10."""

from lightning_blogs.data.base import SplitDataModule
from lightning_blogs.data.digits import DigitsDataModule
from lightning_blogs.data.torchvision_data import (
    CIFAR10DataModule,
    MNISTDataModule,
    TorchvisionDataModule,
    mnist_available,
)

__all__ = [
    "CIFAR10DataModule",
    "DigitsDataModule",
    "MNISTDataModule",
    "SplitDataModule",
    "TorchvisionDataModule",
    "mnist_available",
]
