"""Poisson sampling, which the subsampled-Gaussian accountants' epsilon assumes.

``poisson`` is plain torch/NumPy (batch samplers, the empty-batch collate, ``poisson_dataloader``);
``datamodule`` is the Lightning adapter, :class:`PoissonDataModule`.
"""

from lightning_blogs.sampling.datamodule import PoissonDataModule
from lightning_blogs.sampling.poisson import (
    DistributedPoissonBatchSampler,
    EmptyBatchCollate,
    PoissonBatchSampler,
    is_poisson_sampled,
    poisson_dataloader,
    poisson_sample_rate,
    wrap_collate_with_empty,
)

__all__ = [
    "DistributedPoissonBatchSampler",
    "EmptyBatchCollate",
    "PoissonBatchSampler",
    "PoissonDataModule",
    "is_poisson_sampled",
    "poisson_dataloader",
    "poisson_sample_rate",
    "wrap_collate_with_empty",
]
