"""Fixtures shared across test files: tiny fake MNIST / CIFAR-10 in their real file formats."""

from test_data import fake_cifar, fake_mnist, skip_cifar_md5  # noqa: F401
