"""Lightning adapter: wrap any ``LightningDataModule`` so that its training batches are Poisson-sampled."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from lightning_blogs._validation import check_open_unit_interval, check_positive_int
from lightning_blogs.mechanism.randomness import _check_seed, entropy_seed
from lightning_blogs.sampling.poisson import poisson_dataloader

__all__ = ["PoissonDataModule"]

# Every hook but train_dataloader goes straight to the wrapped module. Binding its bound methods on
# the instance also makes Lightning's ``is_overridden`` see exactly what it sees on the wrapped
# module, so an undefined val_dataloader stays undefined (validation is skipped, not broken).
_DELEGATED_HOOKS = (
    "prepare_data",
    "setup",
    "teardown",
    "val_dataloader",
    "test_dataloader",
    "predict_dataloader",
    "transfer_batch_to_device",
    "on_before_batch_transfer",
    "on_after_batch_transfer",
    "state_dict",
    "load_state_dict",
    "on_exception",
)


def _lightning_replaces_samplers(trainer: pl.Trainer) -> bool:
    """Whether Lightning would put a ``DistributedSampler`` into the train loader.

    Mirrors ``DataConnector._requires_distributed_sampler`` (private in Lightning 2.x, so read
    defensively; if the attributes move, Lightning's own ``TypeError`` still stops the run).
    """
    connector = getattr(trainer, "_accelerator_connector", None)
    return bool(getattr(connector, "use_distributed_sampler", False) and getattr(connector, "is_distributed", False))


class PoissonDataModule(LightningDataModule):
    """``datamodule`` with Poisson-sampled training batches; everything else is delegated to it.

    ``train_dataloader`` rebuilds the wrapped module's training loader with
    :func:`~lightning_blogs.sampling.poisson_dataloader` (same dataset, workers and collate
    function, empty batches allowed); validation, test and predict loaders, ``setup``,
    ``prepare_data``, batch-transfer hooks, state and hyperparameters are the wrapped module's,
    and so is any other attribute (``num_classes``...). Works with any strategy and accelerator.

    Multi-device training: the wrapper reads the data-parallel ``num_replicas`` and ``rank``
    from ``trainer.distributed_sampler_kwargs`` and builds a
    :class:`~lightning_blogs.sampling.DistributedPoissonBatchSampler`, whose union over ranks is
    Poisson-sampled from the whole dataset. Lightning must not replace it with a
    ``DistributedSampler``, so distributed strategies need ``Trainer(use_distributed_sampler=False)``
    (checked; validation and test loaders are then not sharded either, and every rank evaluates
    them whole). One seed is broadcast from rank 0, so processes that share a data-parallel rank
    (tensor parallelism) draw the same batches.

    Args:
        datamodule: the data module to wrap.
        sample_rate: inclusion probability ``q`` in (0, 1); ``None`` keeps the expected
            per-device batch size equal to the wrapped loader's ``batch_size``.
        steps: batches per epoch, >= 1; ``None`` gives ``round(1 / q)``.
        seed: integer in ``[0, 2**64)`` for reproducible batches (not private against whoever
            knows it); ``None`` draws fresh OS entropy for every loader built. From a fixed seed,
            a loader's stream depends on the seed and on the epoch at which Lightning builds it,
            so loaders rebuilt by ``reload_dataloaders_every_n_epochs`` or after resuming from a
            checkpoint do not replay earlier batches.
    """

    def __init__(
        self,
        datamodule: LightningDataModule,
        sample_rate: float | None = None,
        steps: int | None = None,
        seed: int | None = None,
    ) -> None:
        if not isinstance(datamodule, LightningDataModule):
            raise ValueError(f"datamodule must be a LightningDataModule, got {type(datamodule).__name__}")
        self.datamodule = datamodule  # before super().__init__(), which sets the forwarded ``trainer``
        super().__init__()
        self.sample_rate = None if sample_rate is None else check_open_unit_interval("sample_rate", sample_rate)
        self.steps = None if steps is None else check_positive_int("steps", steps)
        self.seed = None if seed is None else _check_seed(seed)
        self.prepare_data_per_node = datamodule.prepare_data_per_node
        self.allow_zero_length_dataloader_with_multiple_devices = (
            datamodule.allow_zero_length_dataloader_with_multiple_devices
        )
        self._log_hyperparams = datamodule._log_hyperparams
        for name in _DELEGATED_HOOKS:
            setattr(self, name, getattr(datamodule, name))

    def __getattr__(self, name: str) -> Any:
        if name == "datamodule":  # not set yet (e.g. while unpickling): no delegation
            raise AttributeError(name)
        return getattr(self.datamodule, name)

    @property  # type: ignore[override]
    def trainer(self) -> pl.Trainer | None:
        """The Trainer, shared with the wrapped module (its hooks may read it)."""
        return self.datamodule.trainer

    @trainer.setter
    def trainer(self, trainer: pl.Trainer | None) -> None:
        self.datamodule.trainer = trainer

    @property
    def hparams(self) -> Any:
        """The wrapped module's hyperparameters (logged as if it were not wrapped)."""
        return self.datamodule.hparams

    @property
    def hparams_initial(self) -> Any:
        """The wrapped module's initial hyperparameters."""
        return self.datamodule.hparams_initial

    def train_dataloader(self) -> DataLoader:
        """The wrapped module's training loader, rebuilt with Poisson sampling for this rank."""
        trainer = self.trainer
        sampler_kwargs = trainer.distributed_sampler_kwargs if trainer is not None else None
        num_replicas, rank = (sampler_kwargs["num_replicas"], sampler_kwargs["rank"]) if sampler_kwargs else (1, 0)
        if trainer is not None and _lightning_replaces_samplers(trainer):
            raise ValueError(
                "use_distributed_sampler must be False (Trainer(use_distributed_sampler=False)) with the distributed "
                f"strategy {type(trainer.strategy).__name__}: PoissonDataModule shards the Poisson batches itself, and "
                "Lightning would try to put a DistributedSampler in place of its batch sampler"
            )
        return poisson_dataloader(
            self.datamodule.train_dataloader(),
            self.sample_rate,
            steps=self.steps,
            seed=self._loader_seed(trainer),
            num_replicas=num_replicas,
            rank=rank,
        )

    def _loader_seed(self, trainer: pl.Trainer | None) -> int | None:
        if self.seed is not None:
            # A reproducible stream per epoch at which a loader is built: reloading must not replay batches.
            epoch = trainer.current_epoch if trainer is not None else 0
            return int(np.random.SeedSequence(self.seed, spawn_key=(epoch,)).generate_state(1, np.uint64)[0])
        if trainer is None or trainer.world_size == 1:
            return None  # the sampler draws (and does not keep) its own OS entropy
        return trainer.strategy.broadcast(entropy_seed())
