"""Trains a classifier with DPSGD under DDP on 2 CPU processes (gloo); run by test_dpsgd.py.

Usage: python ddp_dpsgd_train.py OUT_DIR

Two fits. First one step of TinyClassifier without noise (noise_multiplier=0): its gradient must be
the clipped per-example gradients of the GLOBAL batch (both ranks' examples), summed and divided by
the global expected batch size. Then an epoch of a module with a "probe" layer whose data gradient
is exactly zero, so that its ``.grad`` after DPSGD is pure noise: the test checks that the noise is
the same on both ranks and has the variance of ONE draw divided by the global expected batch size.
Every rank saves to OUT_DIR/rank{R}.pt the first fit's gradient and its part of that batch, and the
second fit's final parameters, probe gradients, step count and expected batch size.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from lightning_helpers import TinyClassifier, parameters_vector, quiet_trainer, tiny_loader

from lightning_blogs import DPSGD

NOISE_MULTIPLIER, CLIP_NORM = 1.0, 0.5


class ProbedClassifier(TinyClassifier):
    """TinyClassifier plus a 10 -> 1000 probe whose contribution to the loss is multiplied by 0."""

    def __init__(self) -> None:
        super().__init__()
        self.probe = torch.nn.Linear(10, 1000, bias=False)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y) + 0.0 * self.probe(x).sum()


class GradRecorder(Callback):
    """Copies the batches, and the gradients as the optimizer will see them (DPSGD runs first)."""

    def __init__(self) -> None:
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.grads: list[torch.Tensor] = []
        self.probe_grads: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append(tuple(t.clone() for t in batch))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads.append(torch.cat([p.grad.reshape(-1).clone() for p in pl_module.net.parameters()]))
        if hasattr(pl_module, "probe"):
            self.probe_grads.append(pl_module.probe.weight.grad.detach().clone())


def main() -> None:
    out_dir = Path(sys.argv[1])
    torch.manual_seed(0)
    module, noiseless = TinyClassifier(), GradRecorder()
    trainer = quiet_trainer(
        max_steps=1, strategy="ddp", devices=2, callbacks=[DPSGD(noise_multiplier=0.0, clip_norm=CLIP_NORM), noiseless]
    )
    trainer.fit(module, tiny_loader(n=64))

    torch.manual_seed(0)
    module = ProbedClassifier()
    dpsgd, recorder = DPSGD(noise_multiplier=NOISE_MULTIPLIER, clip_norm=CLIP_NORM), GradRecorder()
    trainer = quiet_trainer(max_epochs=1, strategy="ddp", devices=2, callbacks=[dpsgd, recorder])
    trainer.fit(module, tiny_loader(n=64))
    torch.save(
        {
            "params": parameters_vector(module),
            "probe_grads": torch.stack(recorder.probe_grads),
            "noiseless_grad": noiseless.grads[0],
            "noiseless_batch": noiseless.batches[0],
            "steps": dpsgd.steps,
            "expected_batch_size": dpsgd.expected_batch_size,
        },
        out_dir / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main()
