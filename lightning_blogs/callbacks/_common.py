"""What the Lightning adapters share: refusing what they cannot do, and the rank-0 entropy seed."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn

from lightning_blogs.mechanism import entropy_seed


def check_trainer_supported(
    owner: str, trainer: pl.Trainer, pl_module: pl.LightningModule, *, sharded_reason: str, manual_hint: str = ""
) -> None:
    """Refuse sharded strategies and manual optimization; warn when ``gradient_clip_val`` is set.

    Lightning clips after ``on_before_optimizer_step``, so ``gradient_clip_val`` would change the
    privatised gradient without changing the privacy statement.
    """
    if isinstance(trainer.strategy, FSDPStrategy | DeepSpeedStrategy | ModelParallelStrategy):
        raise ValueError(
            f"{owner} does not support strategy={type(trainer.strategy).__name__}: {sharded_reason}, which "
            "sharded strategies (FSDP, DeepSpeed, model parallel) do not. Use strategy='ddp' or a single device."
        )
    if not pl_module.automatic_optimization:
        raise ValueError(
            f"{owner} supports automatic optimization only "
            f"(LightningModule.automatic_optimization = True){manual_hint}."
        )
    if trainer.gradient_clip_val:
        rank_zero_warn(
            f"Trainer(gradient_clip_val={trainer.gradient_clip_val}) clips AFTER {owner} has privatised the "
            f"gradients: it changes training but not the privacy statement. Use {owner}(clip_norm=...) for "
            "clipping and leave gradient_clip_val unset."
        )


def shared_entropy_seed(trainer: pl.Trainer) -> int:
    """A fresh OS-entropy seed drawn on rank 0 and broadcast once, so every rank draws the same
    permutations and noise (what keeps DDP replicas identical)."""
    return trainer.strategy.broadcast(entropy_seed() if trainer.is_global_zero else None, src=0)
