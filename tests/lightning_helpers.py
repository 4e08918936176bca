"""Small models and loaders shared by the Lightning tests (fast on two CPU cores)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


class TinyClassifier(pl.LightningModule):
    """A two-layer perceptron on 10 features; shapes chosen so block sizes do not divide numels."""

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(10, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def tiny_loader(n: int = 48, batch_size: int = 8, shuffle: bool = False) -> DataLoader:
    """A fixed synthetic classification data set (the same for every call)."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(n, 10, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


def quiet_trainer(**kwargs: Any) -> pl.Trainer:
    """A CPU Trainer without progress bar, model summary, logger or checkpoints unless given."""
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def parameters_vector(module: torch.nn.Module) -> torch.Tensor:
    """All parameters of ``module`` as one flat tensor (a copy)."""
    return torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])


class Crash(RuntimeError):
    """A simulated crash in the middle of training."""


class CrashAtEpoch(pl.Callback):
    """Raises :class:`Crash` when epoch ``epoch`` starts (after the previous epoch's checkpoint)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise Crash
