"""Common base of the package's data modules: three splits and their loaders."""

from __future__ import annotations

from typing import ClassVar

from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from lightning_blogs._validation import check_non_negative_int, check_positive_int

__all__ = ["SplitDataModule"]


class SplitDataModule(LightningDataModule):
    """A data module with ``train_set``, ``val_set`` and ``test_set`` built in :meth:`setup`.

    Subclasses fill the three datasets in ``setup`` and set the class attributes
    ``num_channels``, ``image_size`` (height = width, in pixels) and ``num_classes``, which a
    Hydra config can pass on to a model's ``in_channels`` / ``image_size`` / ``num_classes``.

    Args:
        batch_size: examples per batch, >= 1 (all three loaders).
        num_workers: ``DataLoader`` worker processes, >= 0 (0 loads in the main process).
    """

    num_channels: ClassVar[int]
    image_size: ClassVar[int]
    num_classes: ClassVar[int]

    def __init__(self, batch_size: int = 64, num_workers: int = 0) -> None:
        super().__init__()
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.num_workers = check_non_negative_int("num_workers", num_workers)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def _loader(self, dataset: Dataset | None, *, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must be called before asking for a data loader")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches; the last batch may be smaller than ``batch_size``."""
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in a fixed order."""
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches in a fixed order."""
        return self._loader(self.test_set, shuffle=False)
