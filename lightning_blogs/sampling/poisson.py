"""Poisson sampling: every example joins every batch independently with probability ``sample_rate``.

Subsampled-Gaussian accountants (RDP, PLD) prove their epsilon for exactly this sampling: batches of
variable size, empty batches possible, and every batch counted as a step. Shuffled fixed-size
batches are a different mechanism, and the accountant's number does not hold for them.

Randomness. Which examples are in a batch is privacy-relevant, so the draws come from NumPy's
PCG64 seeded through ``SeedSequence`` with 64 bits of OS entropy (:func:`entropy_seed`) unless the
user gives a seed. torch's CPU generator (mt19937) keeps only the low 32 bits of a seed, which
would make every batch replayable from 2**32 guesses; ``SeedSequence`` uses the whole seed (as
:class:`~lightning_blogs.mechanism.RandomSource` does for permutations). A user seed makes
the batches reproducible and, by the same token, not private against whoever knows it.

Nothing here imports Lightning: :class:`~lightning_blogs.sampling.PoissonDataModule` is the thin
Lightning adapter over these pieces.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler

from lightning_blogs._validation import check_non_negative_int, check_open_unit_interval, check_positive_int
from lightning_blogs.mechanism.randomness import _check_seed, entropy_seed

__all__ = [
    "DistributedPoissonBatchSampler",
    "EmptyBatchCollate",
    "PoissonBatchSampler",
    "is_poisson_sampled",
    "poisson_dataloader",
    "poisson_sample_rate",
    "wrap_collate_with_empty",
]

# DataLoader settings that carry over unchanged to the Poisson loader (``in_order`` is torch >= 2.6).
_KEPT_LOADER_SETTINGS = (
    "num_workers",
    "pin_memory",
    "pin_memory_device",
    "timeout",
    "worker_init_fn",
    "multiprocessing_context",
    "generator",
    "prefetch_factor",
    "persistent_workers",
    "in_order",
)


class _PoissonSampling(Sampler[list[int]]):
    """Poisson sampling of the shard ``rank, rank + num_replicas, ...`` of ``range(num_samples)``."""

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        steps: int | None,
        seed: int | None,
        num_replicas: int,
        rank: int,
    ) -> None:
        self.num_samples = check_positive_int("num_samples", num_samples)
        self.sample_rate = check_open_unit_interval("sample_rate", sample_rate)
        self.steps = round(1.0 / self.sample_rate) if steps is None else check_positive_int("steps", steps)
        self.seed = None if seed is None else _check_seed(seed)
        self.num_replicas = num_replicas
        self.rank = rank
        # The entropy seed is not kept: the generator's state is all that is needed, and an attribute
        # holding it could end up in a log or a pickle.
        root = entropy_seed() if seed is None else self.seed
        # spawn_key=(rank,) gives every rank its own independent stream from one shared seed.
        self._rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(root, spawn_key=(rank,))))

    @property
    def expected_batch_size(self) -> float:
        """``sample_rate * num_samples``: the expected size of the (global) batch, the public normaliser."""
        return self.sample_rate * self.num_samples

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        shard_size = len(range(self.rank, self.num_samples, self.num_replicas))
        for _ in range(self.steps):
            chosen = np.flatnonzero(self._rng.random(shard_size) < self.sample_rate)
            yield (self.rank + self.num_replicas * chosen).tolist()


class PoissonBatchSampler(_PoissonSampling):
    """Batches of dataset indices in which every index appears independently with prob. ``sample_rate``.

    Pass it to ``DataLoader(dataset, batch_sampler=...)`` together with an empty-batch-safe collate
    function (:func:`wrap_collate_with_empty`), or let :func:`poisson_dataloader` do both. Batch
    sizes follow ``Binomial(num_samples, sample_rate)``; a batch can be empty and is still yielded,
    because the accountant counts it as a step. Indices within a batch are in increasing order.
    Each ``iter()`` (epoch) continues the same random stream, so epochs differ.

    Args:
        num_samples: size of the dataset, >= 1.
        sample_rate: inclusion probability ``q`` of every example in every batch, in (0, 1).
        steps: batches per epoch (``len()``), >= 1; ``None`` gives ``round(1 / sample_rate)``,
            which sees each example once per epoch on average.
        seed: integer in ``[0, 2**64)`` for reproducible batches (not private against whoever
            knows it); ``None`` seeds from the operating system's entropy pool.
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        steps: int | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(num_samples, sample_rate, steps, seed, num_replicas=1, rank=0)


class DistributedPoissonBatchSampler(_PoissonSampling):
    """The local part, on one data-parallel rank, of a global Poisson batch.

    Rank ``r`` owns the fixed shard ``r, r + num_replicas, r + 2 num_replicas, ...`` of the dataset
    and includes each of its examples independently with probability ``sample_rate``. The shards
    are disjoint and cover the dataset, and the ranks' random streams are independent, so the
    global batch (the union of the local batches of one step) contains every example of the
    whole dataset independently with probability ``sample_rate``: exactly Poisson sampling at
    rate ``sample_rate``, as the accountant assumes. Unlike a ``DistributedSampler`` nothing is
    padded or duplicated; the shard assignment is public and needs no shuffling.

    Every rank yields ``steps`` batches per epoch, empty ones included, so the ranks stay in
    lockstep for the gradient all-reduce. Local batch sizes follow ``Binomial(shard size,
    sample_rate)``. Under DDP, which averages gradients over ranks, a rank that divides its
    summed loss by ``expected_batch_size / num_replicas`` gives the global sum divided by the
    expected global batch size.

    Args:
        num_samples: size of the whole dataset (all ranks), >= 1.
        sample_rate: inclusion probability ``q`` of every example in every global batch, in (0, 1).
        num_replicas: number of data-parallel ranks, >= 1.
        rank: this rank, in ``[0, num_replicas)``.
        steps: batches per epoch on every rank, >= 1; ``None`` gives ``round(1 / sample_rate)``.
        seed: integer in ``[0, 2**64)``, the same on every rank (each rank derives its own
            independent stream from it with ``SeedSequence(seed, spawn_key=(rank,))``);
            ``None`` seeds each rank from its own OS entropy, which is right when every process is
            its own data-parallel rank (with tensor parallelism, ranks that must see the same batch
            need one shared seed: see :class:`~lightning_blogs.sampling.PoissonDataModule`).
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        num_replicas: int,
        rank: int,
        steps: int | None = None,
        seed: int | None = None,
    ) -> None:
        num_replicas = check_positive_int("num_replicas", num_replicas)
        rank = check_non_negative_int("rank", rank)
        if rank >= num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas={num_replicas}), got {rank!r}")
        super().__init__(num_samples, sample_rate, steps, seed, num_replicas=num_replicas, rank=rank)


def _zero_length(batch: Any) -> Any:
    """``batch`` with its batch dimension (the first) cut to length zero, structure and dtypes kept."""
    if isinstance(batch, (torch.Tensor, np.ndarray)):
        if batch.ndim == 0:
            raise ValueError("collate_fn must return batched values (a leading batch dimension), got a 0-d tensor")
        return batch[:0]
    if isinstance(batch, Mapping):
        items = {key: _zero_length(value) for key, value in batch.items()}
        try:
            return type(batch)(items)
        except TypeError:  # a mapping type that cannot be built from a dict (default_collate does the same)
            return items
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)):
        # A batch of strings collates to a list of strings (batch dimension); anything else is a
        # structure (e.g. the (inputs, labels) pair) whose fields are each batched.
        if len(batch) > 0 and all(isinstance(value, (str, bytes)) for value in batch):
            return type(batch)()
        items = [_zero_length(value) for value in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)
    raise ValueError(
        "collate_fn must return tensors, arrays, lists of strings, or mappings/sequences of them to build an "
        f"empty batch, got a {type(batch).__name__}"
    )


class EmptyBatchCollate:
    """A ``collate_fn`` that also accepts an empty list of examples (an empty Poisson batch).

    Non-empty lists go to ``collate_fn``; an empty one gives ``empty_batch``'s structure with
    fresh zero-length views of its tensors, so ``model(x)`` on a ``(0, C, H, W)`` tensor runs
    and the step is still taken. Build it with :func:`wrap_collate_with_empty`. Stateless, so it
    behaves the same in every worker process from the first batch on.

    Args:
        collate_fn: the collate function for non-empty batches.
        empty_batch: the template; its tensors have length zero along the first dimension.
    """

    def __init__(self, collate_fn: Callable[[list[Any]], Any], empty_batch: Any) -> None:
        self.collate_fn = collate_fn
        self.empty_batch = empty_batch

    def __call__(self, examples: list[Any]) -> Any:
        if len(examples) == 0:
            return _zero_length(self.empty_batch)
        return self.collate_fn(examples)


def wrap_collate_with_empty(collate_fn: Callable[[list[Any]], Any], example: Any) -> EmptyBatchCollate:
    """Wrap ``collate_fn`` so that an empty batch becomes zero-length tensors of the right shape and dtype.

    The template is ``collate_fn([example])`` with every tensor (or array) cut to length zero along
    its first (batch) dimension; its values are not kept, only shapes, dtypes and structure. The
    batch dimension must come first. An already wrapped ``collate_fn`` is returned as it is.

    Args:
        collate_fn: the collate function, e.g. ``torch.utils.data.default_collate``.
        example: one item of the dataset (e.g. ``dataset[0]``).

    Raises:
        ValueError: if ``collate_fn``'s output holds something that has no batch dimension.
    """
    if not callable(collate_fn):
        raise ValueError(f"collate_fn must be callable, got {collate_fn!r}")
    if isinstance(collate_fn, EmptyBatchCollate):
        return collate_fn
    return EmptyBatchCollate(collate_fn, _zero_length(collate_fn([example])))


def is_poisson_sampled(dataloader: object) -> bool:
    """Whether ``dataloader``'s batches are Poisson-sampled (its batch sampler is one of this module's)."""
    return isinstance(getattr(dataloader, "batch_sampler", None), _PoissonSampling)


def poisson_sample_rate(dataloader: object) -> float:
    """The sampling rate ``q`` of a Poisson-sampled ``dataloader``, as the accountant needs it.

    Raises:
        ValueError: if ``dataloader`` is not Poisson-sampled (then no subsampled-Gaussian epsilon applies).
    """
    if not is_poisson_sampled(dataloader):
        raise ValueError(
            "dataloader must be Poisson-sampled (built by poisson_dataloader or PoissonDataModule) to have a "
            f"sample_rate, got a {type(dataloader).__name__} with batch_sampler "
            f"{type(getattr(dataloader, 'batch_sampler', None)).__name__}"
        )
    return dataloader.batch_sampler.sample_rate  # type: ignore[attr-defined]


def poisson_dataloader(
    dataloader: DataLoader,
    sample_rate: float | None = None,
    *,
    steps: int | None = None,
    seed: int | None = None,
    num_replicas: int = 1,
    rank: int = 0,
) -> DataLoader:
    """A ``DataLoader`` over ``dataloader``'s dataset whose batches are Poisson-sampled.

    Keeps the dataset, workers, pinning, worker seeding and the collate function (wrapped by
    :func:`wrap_collate_with_empty`, which reads ``dataset[0]`` once for the empty-batch
    template); replaces ``shuffle``/``sampler``/``batch_size``/``drop_last`` by a
    :class:`PoissonBatchSampler` (``num_replicas == 1``) or a
    :class:`DistributedPoissonBatchSampler`.

    Args:
        dataloader: a map-style ``DataLoader`` (an ``IterableDataset`` cannot be subsampled).
        sample_rate: inclusion probability ``q`` in (0, 1). ``None`` keeps the expected batch
            size per rank equal to the original ``batch_size``: ``q = batch_size * num_replicas
            / len(dataset)`` (for a loader that is already Poisson-sampled, its own rate).
        steps: batches per epoch, >= 1; ``None`` gives ``round(1 / q)``.
        seed: integer in ``[0, 2**64)`` for reproducible batches; ``None`` uses OS entropy.
        num_replicas: data-parallel ranks, >= 1.
        rank: this process's data-parallel rank, in ``[0, num_replicas)``.
    """
    if not isinstance(dataloader, DataLoader):
        raise ValueError(f"dataloader must be a torch.utils.data.DataLoader, got {type(dataloader).__name__}")
    dataset = dataloader.dataset
    if isinstance(dataset, IterableDataset):
        raise ValueError("dataloader must be over a map-style dataset; an IterableDataset cannot be Poisson-sampled")
    num_samples = len(dataset)  # type: ignore[arg-type]
    if num_samples == 0:
        raise ValueError("dataloader's dataset must not be empty")
    num_replicas = check_positive_int("num_replicas", num_replicas)
    if sample_rate is None:
        if is_poisson_sampled(dataloader):
            sample_rate = poisson_sample_rate(dataloader)
        elif dataloader.batch_size is None:
            raise ValueError("sample_rate must be given when the dataloader has no batch_size (custom batch_sampler)")
        else:
            sample_rate = dataloader.batch_size * num_replicas / num_samples
            if sample_rate >= 1.0:
                raise ValueError(
                    f"sample_rate must be given: the default batch_size * num_replicas / len(dataset) = "
                    f"{dataloader.batch_size} * {num_replicas} / {num_samples} is not below 1"
                )
    batch_sampler: _PoissonSampling
    if num_replicas == 1 and rank == 0:
        batch_sampler = PoissonBatchSampler(num_samples, sample_rate, steps=steps, seed=seed)
    else:
        batch_sampler = DistributedPoissonBatchSampler(
            num_samples, sample_rate, num_replicas, rank, steps=steps, seed=seed
        )
    kept = {name: getattr(dataloader, name) for name in _KEPT_LOADER_SETTINGS if hasattr(dataloader, name)}
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=wrap_collate_with_empty(dataloader.collate_fn, dataset[0]),
        **kept,
    )
