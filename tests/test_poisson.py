"""Poisson sampling: the distribution the accountant assumes, empty batches, the Lightning wrapper, errors."""

from __future__ import annotations

from collections import namedtuple
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning_helpers import quiet_trainer
from scipy import stats
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset, default_collate

from lightning_blogs.sampling import (
    DistributedPoissonBatchSampler,
    PoissonBatchSampler,
    PoissonDataModule,
    is_poisson_sampled,
    poisson_dataloader,
    poisson_sample_rate,
    wrap_collate_with_empty,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Lightning's few-workers / small-log-interval hints


def _indicators(batches: list[list[int]], num_samples: int) -> np.ndarray:
    """(steps, num_samples) 0/1 matrix: row t marks the examples in batch t."""
    x = np.zeros((len(batches), num_samples), dtype=np.float64)
    for t, batch in enumerate(batches):
        x[t, batch] = 1.0
    return x


def _binomial_gof_pvalue(sizes: np.ndarray, n: int, q: float) -> float:
    """Chi-square goodness of fit of ``sizes`` to Binomial(n, q), tail bins merged to expected >= 5."""
    expected = stats.binom.pmf(np.arange(n + 1), n, q) * len(sizes)
    observed = np.bincount(sizes, minlength=n + 1).astype(np.float64)
    bins_obs, bins_exp, acc_o, acc_e = [], [], 0.0, 0.0
    for o, e in zip(observed, expected, strict=True):
        acc_o, acc_e = acc_o + o, acc_e + e
        if acc_e >= 5:
            bins_obs.append(acc_o)
            bins_exp.append(acc_e)
            acc_o = acc_e = 0.0
    bins_obs[-1] += acc_o
    bins_exp[-1] += acc_e
    return float(stats.chisquare(bins_obs, bins_exp).pvalue)


def _assert_poisson(x: np.ndarray, q: float) -> None:
    """Rows of ``x`` are Poisson(q) samples: inclusion ~ q, pairwise co-inclusion ~ q**2, no lag-1 memory."""
    steps, n = x.shape
    freq = x.mean(axis=0)
    assert np.abs(freq - q).max() < 5 * np.sqrt(q * (1 - q) / steps)
    co = (x.T @ x) / steps
    off_diagonal = co[~np.eye(n, dtype=bool)]
    assert np.abs(off_diagonal - q**2).max() < 5 * np.sqrt(q**2 * (1 - q**2) / steps)
    lag1 = (x[1:] * x[:-1]).mean(axis=0)  # the same example in consecutive batches
    assert np.abs(lag1 - q**2).max() < 5 * np.sqrt(q**2 * (1 - q**2) / steps)
    sizes = x.sum(axis=1).astype(np.int64)
    assert _binomial_gof_pvalue(sizes, n, q) > 1e-3


def test_batch_sizes_follow_binomial() -> None:
    n, q, steps = 200, 0.05, 5000
    sampler = PoissonBatchSampler(n, q, steps=steps, seed=11)
    batches = list(sampler)
    assert len(batches) == len(sampler) == steps
    sizes = np.array([len(b) for b in batches])
    assert abs(sizes.mean() - n * q) < 4 * np.sqrt(n * q * (1 - q) / steps)
    assert sizes.var(ddof=1) == pytest.approx(n * q * (1 - q), rel=0.08)
    assert _binomial_gof_pvalue(sizes, n, q) > 1e-3
    assert all(b == sorted(set(b)) and all(0 <= i < n for i in b) for b in batches)
    assert sampler.expected_batch_size == pytest.approx(n * q)


def test_inclusion_is_independent_bernoulli() -> None:
    n, q, steps = 40, 0.2, 20000
    _assert_poisson(_indicators(list(PoissonBatchSampler(n, q, steps=steps, seed=12)), n), q)


def test_default_steps_is_one_epoch_in_expectation() -> None:
    assert len(PoissonBatchSampler(1000, 0.03)) == 33
    assert len(PoissonBatchSampler(1000, 256 / 60000)) == round(60000 / 256)


def test_distributed_union_is_poisson_over_whole_dataset() -> None:
    n, q, replicas, steps = 31, 0.3, 3, 6000  # 31 is not divisible by 3: shards of 11, 10, 10
    samplers = [DistributedPoissonBatchSampler(n, q, replicas, r, steps=steps, seed=13) for r in range(replicas)]
    per_rank = [list(s) for s in samplers]
    assert [len(s) for s in samplers] == [len(b) for b in per_rank] == [steps] * replicas
    for rank, batches in enumerate(per_rank):
        assert all(i % replicas == rank for batch in batches for i in batch)  # disjoint shards
    union = [sorted(b0 + b1 + b2) for b0, b1, b2 in zip(*per_rank, strict=True)]
    # Pairs on different ranks included: the ranks' streams from one seed must be independent.
    _assert_poisson(_indicators(union, n), q)


def test_entropy_seeding_differs_and_fixed_seed_reproduces() -> None:
    def draw(**kwargs: Any) -> list[list[int]]:
        return list(PoissonBatchSampler(1000, 0.1, steps=5, **kwargs))

    assert draw() != draw()
    assert draw(seed=7) == draw(seed=7)
    assert draw(seed=7) != draw(seed=7 + 2**40)  # the high 32 bits of the seed count too
    a, b = (DistributedPoissonBatchSampler(1000, 0.1, 2, 1, steps=5) for _ in range(2))
    assert list(a) != list(b)


def _image_dataset(n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g))


def test_empty_batches_are_zero_length_tensors_of_the_right_type() -> None:
    loader = poisson_dataloader(DataLoader(_image_dataset(20), batch_size=4), sample_rate=0.01, steps=50, seed=14)
    batches = list(loader)
    assert len(batches) == 50
    empty = [(x, y) for x, y in batches if len(x) == 0]
    assert 30 < len(empty) < 50  # P(empty) = 0.99**20 = 0.82
    x, y = empty[0]
    assert (x.shape, x.dtype, y.shape, y.dtype) == ((0, 1, 4, 4), torch.float32, (0,), torch.int64)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(8, 3))
    assert net(x).shape == (0, 3)


def test_empty_collate_keeps_structure_and_custom_collate() -> None:
    Pair = namedtuple("Pair", ["image", "label"])

    def collate(examples: list[tuple[torch.Tensor, int, str]]) -> dict[str, Any]:
        images, labels, names = zip(*examples, strict=True)
        return {"pair": Pair(torch.stack(images), torch.tensor(labels)), "names": list(names)}

    example = (torch.ones(2, 3), 1, "a")
    wrapped = wrap_collate_with_empty(collate, example)
    full = wrapped([example, example])
    assert full["pair"].image.shape == (2, 2, 3) and full["names"] == ["a", "a"]
    empty = wrapped([])
    assert isinstance(empty["pair"], Pair) and empty["names"] == []
    assert empty["pair"].image.shape == (0, 2, 3) and empty["pair"].label.dtype == torch.int64
    assert wrap_collate_with_empty(wrapped, example) is wrapped


def test_poisson_dataloader_keeps_loader_settings_and_works_with_workers() -> None:
    def collate(examples: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = default_collate(examples)
        return 2 * x, y

    dataset = _image_dataset(40)
    original = DataLoader(dataset, batch_size=8, shuffle=True, drop_last=True, num_workers=2, collate_fn=collate)
    loader = poisson_dataloader(original, seed=15)
    assert is_poisson_sampled(loader) and not is_poisson_sampled(original)
    assert poisson_sample_rate(loader) == pytest.approx(8 / 40)  # expected batch size = original batch size
    assert len(loader) == 5 and loader.dataset is dataset and loader.num_workers == 2
    sizes = []
    for x, y in loader:  # each worker builds empty batches on its own, from the first batch on
        sizes.append(len(x))
        assert x.shape[1:] == (1, 4, 4) and len(y) == len(x)
    assert len(sizes) == 5
    x, _ = next(iter(poisson_dataloader(original, sample_rate=0.5, seed=1)))
    (indices,) = PoissonBatchSampler(40, 0.5, steps=1, seed=1)  # the same seed draws the same batch
    assert torch.equal(x, 2 * dataset.tensors[0][indices])  # the original collate_fn still collates


class _SumLossModel(pl.LightningModule):
    """Cross-entropy summed over the batch and divided by the expected (public) batch size."""

    def __init__(self, expected_batch_size: float) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
        self.expected_batch_size = expected_batch_size
        self.batch_sizes: list[int] = []
        self.empty_losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.batch_sizes.append(len(x))
        loss = torch.nn.functional.cross_entropy(self(x), y, reduction="sum") / self.expected_batch_size
        if len(x) == 0:
            self.empty_losses.append(loss.item())
        self.log("train/loss", loss, on_epoch=True)
        return loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val/loss", torch.nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _SmallDataModule(pl.LightningDataModule):
    def __init__(self, n: int = 20, batch_size: int = 4) -> None:
        super().__init__()
        self.n, self.batch_size = n, batch_size
        self.num_classes = 3

    def setup(self, stage: str | None = None) -> None:
        self.train_set, self.val_set = _image_dataset(self.n), _image_dataset(8)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=4)


def test_trainer_takes_a_step_for_every_batch_including_empty_ones() -> None:
    # q = 0.02 over 20 examples: two thirds of the batches are empty.
    datamodule = PoissonDataModule(_SmallDataModule(n=20), sample_rate=0.02, steps=30, seed=16)
    model = _SumLossModel(expected_batch_size=0.02 * 20)
    trainer = quiet_trainer(max_epochs=2, limit_val_batches=0)
    trainer.fit(model, datamodule=datamodule)
    assert len(model.batch_sizes) == 60 and model.batch_sizes.count(0) > 20
    assert trainer.global_step == 60  # one optimizer step per batch, empty ones included
    assert model.empty_losses == [0.0] * model.batch_sizes.count(0)  # zero loss and zero gradient
    assert torch.isfinite(trainer.callback_metrics["train/loss_epoch"])


def test_wrapper_poisson_train_loader_and_untouched_eval_loaders() -> None:
    inner = _SmallDataModule(n=40, batch_size=4)
    datamodule = PoissonDataModule(inner, seed=17)
    model = _SumLossModel(expected_batch_size=4)
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(model, datamodule=datamodule)
    assert is_poisson_sampled(trainer.train_dataloader)
    assert poisson_sample_rate(trainer.train_dataloader) == pytest.approx(4 / 40)
    assert trainer.global_step == 10
    val = trainer.val_dataloaders
    assert not is_poisson_sampled(val) and val.batch_size == 4 and val.dataset is inner.val_set
    assert datamodule.num_classes == 3 and inner.trainer is trainer
    # Lightning sees the wrapped module's hooks: a test loader it does not define stays undefined.
    assert is_overridden("val_dataloader", datamodule) and not is_overridden("test_dataloader", datamodule)


def test_wrapper_seed_reproduces_and_a_reloaded_loader_draws_anew() -> None:
    def batch_sizes_per_epoch(seed: int) -> list[list[int]]:
        model = _SumLossModel(expected_batch_size=10)
        trainer = quiet_trainer(max_epochs=2, limit_val_batches=0, reload_dataloaders_every_n_epochs=1)
        trainer.fit(model, datamodule=PoissonDataModule(_SmallDataModule(n=100, batch_size=10), seed=seed))
        return [model.batch_sizes[:10], model.batch_sizes[10:]]

    first = batch_sizes_per_epoch(seed=18)
    assert first == batch_sizes_per_epoch(seed=18)
    assert first[0] != first[1]  # the loader rebuilt for epoch 1 does not replay epoch 0


@pytest.mark.parametrize("use_distributed_sampler", [False, True])
def test_wrapper_shards_under_ddp_and_keeps_lightning_off_its_sampler(use_distributed_sampler: bool) -> None:
    # A DDP Trainer that has not launched reports world_size 2, rank 0: enough for the sampler choice.
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", use_distributed_sampler=use_distributed_sampler)
    datamodule = PoissonDataModule(_SmallDataModule(n=40, batch_size=4))
    datamodule.trainer = trainer
    datamodule.setup("fit")
    if use_distributed_sampler:
        with pytest.raises(ValueError, match=r"^use_distributed_sampler must be False"):
            datamodule.train_dataloader()
        return
    sampler = datamodule.train_dataloader().batch_sampler
    assert isinstance(sampler, DistributedPoissonBatchSampler)
    assert (sampler.num_replicas, sampler.rank) == (2, 0)
    assert sampler.sample_rate == pytest.approx(4 * 2 / 40) and len(sampler) == 5  # 4 per device on average


class _Stream(IterableDataset):
    def __iter__(self):  # pragma: no cover - never iterated
        yield from range(3)


class _Opaque(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> object:
        return object()


@pytest.mark.parametrize(
    ("build", "name"),
    [
        (lambda: PoissonBatchSampler(0, 0.1), "num_samples"),
        (lambda: PoissonBatchSampler(10, 0.0), "sample_rate"),
        (lambda: PoissonBatchSampler(10, 1.0), "sample_rate"),
        (lambda: PoissonBatchSampler(10, 0.1, steps=0), "steps"),
        (lambda: PoissonBatchSampler(10, 0.1, seed=-1), "seed"),
        (lambda: DistributedPoissonBatchSampler(10, 0.1, 0, 0), "num_replicas"),
        (lambda: DistributedPoissonBatchSampler(10, 0.1, 2, 2), "rank"),
        (lambda: poisson_dataloader(DataLoader(_Stream(), batch_size=2)), "dataloader"),
        (lambda: poisson_dataloader(DataLoader(_image_dataset(4), batch_size=4)), "sample_rate"),
        (lambda: poisson_dataloader(DataLoader(_Opaque(), batch_size=2, collate_fn=list), 0.5), "collate_fn"),
        (lambda: poisson_sample_rate(DataLoader(_image_dataset(4))), "dataloader"),
        (lambda: PoissonDataModule(object()), "datamodule"),  # type: ignore[arg-type]
        (lambda: PoissonDataModule(_SmallDataModule(), sample_rate=2.0), "sample_rate"),
        (lambda: PoissonDataModule(_SmallDataModule(), steps=0), "steps"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(build: Any, name: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name} must"):
        build()


def test_image_classifier_trains_through_empty_poisson_batches() -> None:
    import lightning.pytorch as pl

    from lightning_blogs.data import DigitsDataModule
    from lightning_blogs.models import ImageClassifier, SmallCNN
    from lightning_blogs.sampling import PoissonDataModule

    # q * n = 0.0008 * 1257 ~ 1 example per batch: about a third of the batches are empty.
    datamodule = PoissonDataModule(DigitsDataModule(batch_size=64), sample_rate=0.0008, steps=30, seed=3)
    module = ImageClassifier(SmallCNN(in_channels=1, image_size=8, num_classes=10))
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 30
    assert all(torch.isfinite(p).all() for p in module.parameters())
