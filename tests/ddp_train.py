"""Trains TinyClassifier with DPBloGS under DDP on 2 CPU processes (gloo); run by test_ddp.py.

Usage: python ddp_train.py OUT_DIR [--rank-seeds]
Every rank saves its final parameters to OUT_DIR/rank{R}.pt. With --rank-seeds each rank gets its
own permutation seed (the mistake DPBloGS avoids by broadcasting rank 0's entropy): a control
showing that the comparison can fail.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from lightning_helpers import TinyClassifier, parameters_vector, quiet_trainer, tiny_loader

from lightning_blogs import DPBloGS


def main() -> None:
    out_dir = Path(sys.argv[1])
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    seed = 1000 + rank if "--rank-seeds" in sys.argv else None
    torch.manual_seed(0)
    module = TinyClassifier()
    cb = DPBloGS(target_epsilon=1e6, clip_norm=0.5, block_size=2, seed=seed)
    trainer = quiet_trainer(max_epochs=2, strategy="ddp", devices=2, callbacks=[cb])
    trainer.fit(module, tiny_loader(n=64))
    torch.save({"params": parameters_vector(module), "steps": cb.steps}, out_dir / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()
