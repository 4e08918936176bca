"""Fixtures shared across test files."""

from fake_datasets import fake_cifar, fake_mnist, skip_cifar_md5

__all__ = ["fake_cifar", "fake_mnist", "skip_cifar_md5"]
