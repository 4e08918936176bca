"""DDP with 2 CPU processes (gloo): every rank applies the same permutations."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("ddp_train.py")


def _run(out_dir: Path, *args: str) -> tuple[dict, dict]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out_dir), *args],
        cwd=SCRIPT.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out_dir / "rank0.pt"), torch.load(out_dir / "rank1.pt")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_ddp_replicas_stay_identical(tmp_path) -> None:
    rank0, rank1 = _run(tmp_path)
    assert rank0["steps"] == rank1["steps"] == 8  # 64 examples / 2 ranks / batch 8 * 2 epochs
    assert torch.equal(rank0["params"], rank1["params"])

    # Control: with a different permutation seed on each rank the replicas drift apart.
    control = tmp_path / "control"
    control.mkdir()
    rank0, rank1 = _run(control, "--rank-seeds")
    assert not torch.equal(rank0["params"], rank1["params"])
