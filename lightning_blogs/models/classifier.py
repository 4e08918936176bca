"""A LightningModule that trains any image classification network with cross-entropy."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from lightning import LightningModule
from torch import Tensor, nn
from torch.nn import Parameter
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau
from torchmetrics.classification import MulticlassAccuracy

from lightning_blogs._validation import check_positive_int

__all__ = ["ImageClassifier", "OptimizerFactory", "SchedulerFactory", "default_optimizer"]

OptimizerFactory = Callable[[Iterable[Parameter]], Optimizer]
"""Builds the optimizer from the trainable parameters, e.g. ``partial(SGD, lr=0.1)``."""
SchedulerFactory = Callable[[Optimizer], LRScheduler | ReduceLROnPlateau]
"""Builds a learning-rate scheduler from the optimizer, e.g. ``partial(StepLR, step_size=5)``."""

default_optimizer: OptimizerFactory = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)
"""The optimizer used when none is given: SGD with learning rate 0.1 and momentum 0.9."""

_PRIMITIVES = (bool, int, float, str, type(None))


def _describe(factory: Callable[..., Any] | None) -> dict[str, Any] | None:
    """A checkpoint-safe (plain data only) description of an optimizer/scheduler factory."""
    if factory is None:
        return None
    func, args, kwargs = factory, (), {}
    if isinstance(factory, functools.partial):
        func, args, kwargs = factory.func, factory.args, factory.keywords

    def plain(value: Any) -> Any:
        return value if isinstance(value, _PRIMITIVES) else repr(value)

    target = getattr(func, "__qualname__", None) or repr(func)
    module = getattr(func, "__module__", None)
    return {
        "target": f"{module}.{target}" if module else target,
        "args": [plain(a) for a in args],
        "kwargs": {str(k): plain(v) for k, v in kwargs.items()},
    }


def _infer_num_classes(net: nn.Module) -> int:
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("num_classes could not be inferred (net has no nn.Linear layer); pass num_classes")
    return linears[-1].out_features


class ImageClassifier(LightningModule):
    """Trains ``net`` (images -> logits) with cross-entropy and reports accuracy.

    Logged metrics (averaged over the epoch; accuracy is the plain fraction correct, in
    [0, 1], and shown in the progress bar): ``train/loss``, ``train/acc`` (``train/loss`` is
    also logged per step), ``val/loss``, ``val/acc``, ``test/loss``, ``test/acc``.

    Batches are ``(images, labels)`` with labels ``int64`` class indices in
    ``[0, num_classes)``.

    Checkpoints: the optimizer and scheduler factories are *not* stored as hyperparameters
    (arbitrary callables cannot be loaded by ``torch.load(weights_only=True)``, the default
    since torch 2.6); a plain-data description of them is stored under the checkpoint key
    ``"image_classifier"`` instead. So ``ImageClassifier.load_from_checkpoint(path, net=...)``
    works with the default (safe) loading; pass ``optimizer=`` / ``lr_scheduler=`` again there
    if you want to keep training with them (resuming with ``Trainer.fit(ckpt_path=...)`` on a
    freshly built module restores the optimizer state as usual).

    Args:
        net: the network, mapping ``(batch, C, H, W)`` float images to ``(batch,
            num_classes)`` logits. Stored as ``self.net``.
        optimizer: factory called with the trainable parameters (as Hydra's
            ``_partial_: true`` gives, e.g. ``functools.partial(torch.optim.Adam, lr=1e-3)``);
            ``None`` uses :data:`default_optimizer` (SGD, lr 0.1, momentum 0.9).
        lr_scheduler: optional factory called with the optimizer, stepped once per epoch;
            a ``ReduceLROnPlateau`` monitors ``val/loss``.
        num_classes: number of classes, >= 1; ``None`` takes the ``out_features`` of the
            last ``nn.Linear`` registered in ``net`` (right for the package's models).
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerFactory | None = None,
        lr_scheduler: SchedulerFactory | None = None,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise ValueError(f"net must be a torch.nn.Module, got {type(net).__name__}")
        if optimizer is not None and not callable(optimizer):
            raise ValueError(f"optimizer must be a callable (e.g. a partial) or None, got {optimizer!r}")
        if lr_scheduler is not None and not callable(lr_scheduler):
            raise ValueError(f"lr_scheduler must be a callable (e.g. a partial) or None, got {lr_scheduler!r}")
        if num_classes is None:
            num_classes = _infer_num_classes(net)
        num_classes = check_positive_int("num_classes", num_classes)

        self.save_hyperparameters(ignore=["net", "optimizer", "lr_scheduler"])
        self.hparams["num_classes"] = num_classes  # the inferred value, for reloading
        self.net = net
        self.optimizer_factory: OptimizerFactory = optimizer or default_optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.num_classes = num_classes
        self.criterion = nn.CrossEntropyLoss()
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(batch, num_classes)`` for images ``x``."""
        return self.net(x)

    def _step(self, batch: tuple[Tensor, Tensor], stage: str, accuracy: MulticlassAccuracy) -> Tensor:
        x, y = batch
        logits = self(x)
        batch_size = y.shape[0]
        if batch_size == 0:
            # Poisson sampling yields empty batches, which still count as steps: return a zero
            # loss (zero gradient) instead of the NaN of a mean over nothing, and log nothing.
            return logits.sum() * 0.0
        loss = self.criterion(logits, y)
        accuracy(logits, y)
        self.log(f"{stage}/loss", loss, on_step=stage == "train", on_epoch=True, batch_size=batch_size)
        self.log(
            f"{stage}/acc",
            accuracy,
            on_step=False,
            on_epoch=True,
            prog_bar=True,
            batch_size=batch_size,
        )
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Cross-entropy on one batch; logs ``train/loss`` and ``train/acc``."""
        return self._step(batch, "train", self.train_acc)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Logs ``val/loss`` and ``val/acc``."""
        return self._step(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Logs ``test/loss`` and ``test/acc``."""
        return self._step(batch, "test", self.test_acc)

    def configure_optimizers(self) -> Optimizer | dict[str, Any]:
        """Build the optimizer over trainable parameters, plus the scheduler if given."""
        optimizer = self.optimizer_factory(p for p in self.parameters() if p.requires_grad)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        config: dict[str, Any] = {"scheduler": scheduler, "interval": "epoch"}
        if isinstance(scheduler, ReduceLROnPlateau):
            config["monitor"] = "val/loss"
        return {"optimizer": optimizer, "lr_scheduler": config}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record plain-data descriptions of the optimizer and scheduler factories."""
        checkpoint["image_classifier"] = {
            "optimizer": _describe(self.optimizer_factory),
            "lr_scheduler": _describe(self.lr_scheduler_factory),
        }
