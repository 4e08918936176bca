"""scikit-learn's bundled 8x8 handwritten digits as a Lightning data module.

The data (1797 greyscale 8x8 images of the digits 0-9, pixel values 0-16) ships inside
scikit-learn, so this module works fully offline and is the package's default dataset.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import TensorDataset

from lightning_blogs._validation import check_int, check_open_unit_interval
from lightning_blogs.data.base import SplitDataModule

__all__ = ["DigitsDataModule"]


class DigitsDataModule(SplitDataModule):
    """8x8 handwritten digits (``sklearn.datasets.load_digits``), split into train/val/test.

    The 1797 images are split once, deterministically and stratified by label, into
    ``test_fraction`` test, ``val_fraction`` validation and the rest training examples (each
    fraction is of all 1797 examples); the same ``split_seed`` always gives the same split.
    Each image is a ``float32`` tensor of shape ``(1, 8, 8)``: pixels are first scaled to
    [0, 1] (``pixel / 16``) and then standardised with the scalar mean and standard deviation
    of the *training* split, so training pixels have mean 0 and standard deviation 1. Labels
    are ``int64`` in 0-9.

    Args:
        batch_size: examples per batch, >= 1 (all three loaders).
        val_fraction: fraction of all examples held out for validation, in (0, 1).
        test_fraction: fraction of all examples held out for testing, in (0, 1);
            ``val_fraction + test_fraction`` must be < 1.
        split_seed: seed of the stratified split (any integer).
        num_workers: ``DataLoader`` worker processes, >= 0 (0 loads in the main process).

    After :meth:`setup`, ``train_indices``, ``val_indices`` and ``test_indices`` hold the
    positions (into ``load_digits().data``) of each split, and ``mean`` / ``std`` the
    normalisation constants (in [0, 1] pixel units).
    """

    num_channels: ClassVar[int] = 1
    image_size: ClassVar[int] = 8
    num_classes: ClassVar[int] = 10
    num_examples: ClassVar[int] = 1797

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        split_seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        self.val_fraction = check_open_unit_interval("val_fraction", val_fraction)
        self.test_fraction = check_open_unit_interval("test_fraction", test_fraction)
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                "val_fraction + test_fraction must be < 1 to leave training data, got "
                f"val_fraction={val_fraction!r} + test_fraction={test_fraction!r}"
            )
        self.split_seed = check_int("split_seed", split_seed)
        self.save_hyperparameters()

        self.train_indices: np.ndarray | None = None
        self.val_indices: np.ndarray | None = None
        self.test_indices: np.ndarray | None = None
        self.mean: float | None = None
        self.std: float | None = None

    def setup(self, stage: str | None = None) -> None:
        """Load the digits and build all three splits (cheap, idempotent; ``stage`` ignored)."""
        if self.train_set is not None:
            return
        digits = load_digits()
        images = np.asarray(digits.data, dtype=np.float64) / 16.0  # (1797, 64), in [0, 1]
        labels = np.asarray(digits.target, dtype=np.int64)
        indices = np.arange(len(labels))

        rest, test = train_test_split(
            indices, test_size=self.test_fraction, stratify=labels, random_state=self.split_seed
        )
        # val_fraction is a fraction of the whole data set; rescale it to the remainder.
        train, val = train_test_split(
            rest,
            test_size=self.val_fraction / (1.0 - self.test_fraction),
            stratify=labels[rest],
            random_state=self.split_seed,
        )
        self.train_indices, self.val_indices, self.test_indices = train, val, test

        mean = float(images[train].mean())
        std = float(images[train].std())
        self.mean, self.std = mean, std

        def make(split: np.ndarray) -> TensorDataset:
            x = torch.from_numpy((images[split] - mean) / std).to(torch.float32)
            x = x.reshape(-1, self.num_channels, self.image_size, self.image_size)
            return TensorDataset(x, torch.from_numpy(labels[split]))

        self.train_set, self.val_set, self.test_set = make(train), make(val), make(test)
